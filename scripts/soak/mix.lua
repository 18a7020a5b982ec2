-- wrk request mix for the soak: successes, rewritten upstream errors, auth rejections, 404s,
-- login failures (which lock accounts) and rate-limited requests.
local token = os.getenv("SOAK_TOKEN") or ""
local paths = {
  {"GET", "/api/v1/calls", {["Authorization"] = "Bearer " .. token}},          -- 200 (rate limited per user at times)
  {"GET", "/api/v1/demo/html-500", {}},                                         -- 500 rewritten
  {"GET", "/api/v1/demo/foreign-json", {}},                                     -- 422 rewritten
  {"GET", "/api/v1/calls", {}},                                                 -- 401
  {"GET", "/nowhere", {}},                                                      -- 404
  {"GET", "/api/v1/demo/nope", {}},                                             -- 404 rewritten
}
local n = 0
request = function()
  n = n + 1
  if n % 10 == 0 then
    local body = string.format('{"email":"soak%d@example.com","password":"wrong"}', n % 5000)
    return wrk.format("POST", "/api/v1/auth/login", {["Content-Type"] = "application/json"}, body)
  end
  local p = paths[(n % #paths) + 1]
  return wrk.format(p[1], p[2], p[3])
end

-- Any error answer that is not the envelope is reported at once (each wrk thread reports its
-- first); soak.sh fails when the report appears.
local warned = false
response = function(status, headers, body)
  if status >= 400 and not warned and not string.find(body, '^{"status":"error","message":"') then
    io.write(string.format("non-envelope answer: %d %s\n", status, string.sub(body, 1, 80)))
    warned = true
  end
end
