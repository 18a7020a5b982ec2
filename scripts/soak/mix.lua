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

local statuses = {}
response = function(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status >= 400 and not string.find(body, '^{"status":"error","message":"') then
    statuses["non-envelope"] = (statuses["non-envelope"] or 0) + 1
  end
end

done = function(summary, latency, requests)
  io.write("soak: status counts (from one wrk thread):")
  for k, v in pairs(statuses) do io.write(string.format(" %s=%d", tostring(k), v)) end
  io.write("\n")
end
