#!/usr/bin/env python3
"""Makes tests/data/tokens.json: JWTs minted by an implementation independent of the gateway's
(PyJWT), so the end-to-end tests do not only check the gateway against its own library.

Re-run with:  pip install pyjwt && python3 tests/data/make_tokens.py > tests/data/tokens.json
Valid tokens expire on 2100-01-01; expired ones expired in 2020.
"""
import base64, hashlib, hmac, json, sys
import jwt  # PyJWT

SECRET = "fixture-secret-0123456789abcdef"
PREVIOUS = "fixture-previous-secret-0123456"
OTHER = "some-other-secret-0123456789abc"
FAR = 4102444800   # 2100-01-01
PAST = 1600000000  # 2020-09-13


def claims(**over):
    c = {"tid": "tenant-1", "sub": "user-1", "email": "agent@example.com", "role": "agent",
         "iss": "get2dial", "aud": "get2dial-control", "exp": FAR, "iat": PAST}
    for k, v in over.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    return c


def hs256(c, secret=SECRET):
    return jwt.encode(c, secret, algorithm="HS256")


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header, c, secret=SECRET, sign=True):
    """A token assembled by hand, for headers PyJWT refuses to produce."""
    msg = b64(json.dumps(header).encode()) + "." + b64(json.dumps(c).encode())
    sig = b64(hmac.new(secret.encode(), msg.encode(), hashlib.sha256).digest()) if sign else ""
    return msg + "." + sig


valid_admin = hs256(claims(role="admin", sub="admin-1", email="admin@example.com"))
tokens = {
    "valid_agent": hs256(claims()),
    "valid_supervisor": hs256(claims(role="supervisor", sub="super-1", email="super@example.com")),
    "valid_admin": valid_admin,
    "valid_platform_admin": hs256(claims(role="platform_admin", sub="root-1", tid="tenant-0", email="ops@example.com")),
    "valid_no_email": hs256(claims(email=None)),
    "previous_secret_admin": hs256(claims(role="admin", sub="admin-2"), PREVIOUS),
    "expired": hs256(claims(exp=PAST)),
    "not_yet_valid": hs256(claims(nbf=FAR - 1000)),
    "wrong_secret": hs256(claims(), OTHER),
    "wrong_iss": hs256(claims(iss="someone-else")),
    "wrong_aud": hs256(claims(aud="another-service")),
    "missing_tid": hs256(claims(tid=None)),
    "missing_sub": hs256(claims(sub=None)),
    "missing_exp": hs256(claims(exp=None)),
    "unknown_role": hs256(claims(role="root")),
    "alg_none": hand_made({"alg": "none", "typ": "JWT"}, claims(role="platform_admin"), sign=False),
    "alg_rs256_header": hand_made({"alg": "RS256", "typ": "JWT"}, claims(role="platform_admin")),
    "alg_hs512": jwt.encode(claims(), SECRET, algorithm="HS512"),
    "truncated": valid_admin[:-12],
    "garbage": "this-is-not-a-jwt",
    "long_16k": hs256(claims(pad="x" * 16384)),
}
json.dump({
    "made_with": f"PyJWT {jwt.__version__} and hand-made HMAC-SHA256 (tests/data/make_tokens.py)",
    "secret": SECRET,
    "previous_secret": PREVIOUS,
    "tokens": tokens,
}, sys.stdout, indent=1, sort_keys=True)
sys.stdout.write("\n")
