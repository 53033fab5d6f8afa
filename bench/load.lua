-- wrk script of bench/load.py: alternates manifest and blob GETs over a list of request targets (only
-- blob GETs when the list has no manifest line).
--
--   wrk -c 1000 -t 2 -d 20s --latency -s bench/load.lua http://127.0.0.1:PORT -- PATHS_FILE
--
-- PATHS_FILE is bench/httpload.py's: one "HEAD /v2/…/manifests/<tag>…" or "GET /v2/…/blobs/<digest>…"
-- per line. wrk 4.1 cannot do HEAD (its parser waits for the body the answer's Content-Length announces,
-- wg/wrk#198), so the HEAD lines are sent as GETs: every connection sends manifest GET, blob GET,
-- manifest GET… (keep-alive), each thread starting at a different offset.
-- done() prints one line "K3RD-RESULT {json}" with the totals, the error counts and latency percentiles
-- in microseconds, for load.py to parse (wrk's own text output stays as it is).

local ACCEPT = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, "
  .. "application/vnd.docker.distribution.manifest.list.v2+json, "
  .. "application/vnd.docker.distribution.manifest.v2+json"

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

local heads, gets = {}, {}
local n = 0

function init(args)
  local file = args[1] or error("load.lua needs the paths file: wrk … URL -- PATHS_FILE")
  for line in io.lines(file) do
    local method, path = line:match("^(%u+)%s+(%S+)%s*$")
    if method == "HEAD" then
      heads[#heads + 1] = wrk.format("GET", path, { Accept = ACCEPT })
    elseif method == "GET" then
      gets[#gets + 1] = wrk.format("GET", path)
    end
  end
  if #gets == 0 then
    error("load.lua: " .. file .. " needs at least one GET line")
  end
  n = (id or 0) * 7
end

function request()
  n = n + 1
  if #heads == 0 then
    return gets[n % #gets + 1]
  end
  local k = math.floor(n / 2)
  if n % 2 == 0 then
    return heads[k % #heads + 1]
  end
  return gets[k % #gets + 1]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'K3RD-RESULT {"requests": %d, "duration_us": %d, "bytes": %d, "errors": {"connect": %d, '
      .. '"read": %d, "write": %d, "status": %d, "timeout": %d}, "latency_us": {"min": %d, '
      .. '"mean": %.1f, "stdev": %.1f, "p50": %d, "p90": %d, "p99": %d, "p999": %d, "max": %d}}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max))
end
