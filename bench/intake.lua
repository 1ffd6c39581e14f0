-- wrk script: POST pre-signed CVAT deliveries, cycling through a file of "signature<TAB>body" lines.
--   wrk -t1 -c16 -d10s -s bench/intake.lua http://127.0.0.1:PORT/webhooks/cvat -- BODIES_FILE [OFFSET]
-- Signing in Lua is impractical, so bench/intake.py writes N distinct signed bodies (every request a
-- new event, the receiver's full path) or a few already-received ones (the duplicate path).
-- done() prints one line "BENCH {json}" that bench/intake.py parses.

local sigs, bodies, n, i = {}, {}, 0, 0

function init(args)
  local path = args[1]
  for line in io.lines(path) do
    local tab = line:find("\t", 1, true)
    if tab then
      n = n + 1
      sigs[n] = line:sub(1, tab - 1)
      bodies[n] = line:sub(tab + 1)
    end
  end
  if n == 0 then
    error("no bodies in " .. tostring(path))
  end
  i = tonumber(args[2] or "0") % n
end

function request()
  i = i % n + 1
  return wrk.format("POST", nil,
    {["Content-Type"] = "application/json", ["X-Signature-256"] = sigs[i]}, bodies[i])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
