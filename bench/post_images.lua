-- wrk script: POST raw image bodies to wrk's URL, cycling through several files, then print a JSON summary.
--
-- Environment:
--   BENCH_BODIES        newline-separated list of image files (each sent as one request body, in turn)
--   BENCH_CONTENT_TYPE  Content-Type of the bodies (default image/png)
-- Usage: BENCH_BODIES="$(ls runs/bench/inputs/x/*.png)" wrk -t2 -c32 -d5s -s bench/post_images.lua http://127.0.0.1:8000/predict
-- The last stdout line starts with "JSONRESULT " followed by one JSON object (latencies in microseconds).

local requests_list = {}
local counter = 0

local function read_file(path)
  local fh = assert(io.open(path, "rb"))
  local data = fh:read("*a")
  fh:close()
  return data
end

init = function(args)
  local content_type = os.getenv("BENCH_CONTENT_TYPE") or "image/png"
  local headers = { ["Content-Type"] = content_type }
  for path in string.gmatch(os.getenv("BENCH_BODIES") or "", "[^\n]+") do
    requests_list[#requests_list + 1] = wrk.format("POST", nil, headers, read_file(path))
  end
  assert(#requests_list > 0, "BENCH_BODIES names no file")
  -- threads start at different offsets so that they do not send the same image at the same time
  counter = math.random(#requests_list)
end

request = function()
  counter = counter % #requests_list + 1
  return requests_list[counter]
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'JSONRESULT {"requests":%d,"duration_us":%d,"bytes":%d,"err_connect":%d,"err_read":%d,"err_write":%d,'
      .. '"non_2xx":%d,"err_timeout":%d,"lat_mean_us":%.1f,"lat_max_us":%d,"p50_us":%d,"p90_us":%d,"p95_us":%d,'
      .. '"p99_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90), latency:percentile(95),
    latency:percentile(99)))
end
