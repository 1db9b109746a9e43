-- wrk script: POST the JSON body read from the file named by the first script argument
-- (`wrk ... -s post.lua URL -- BODY_FILE`) and print one machine-readable summary line.

local body_file = nil

function init(args)
  body_file = args[1]
  local handle = assert(io.open(body_file, "rb"))
  wrk.body = handle:read("*a")
  handle:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

local PERCENTILES = {1, 5, 10, 25, 50, 75, 90, 95, 97, 98, 99, 99.5, 99.9, 99.99}

function done(summary, latency, requests)
  local errors = summary.errors
  local points = {}
  for _, p in ipairs(PERCENTILES) do
    points[#points + 1] = string.format("[%s, %d]", p, latency:percentile(p))
  end
  -- Latencies are in microseconds; duration too.
  io.write(string.format(
    "WRK_JSON {\"requests\": %d, \"duration_us\": %d, \"bytes\": %d, "
      .. "\"errors_connect\": %d, \"errors_read\": %d, \"errors_write\": %d, "
      .. "\"errors_status\": %d, \"errors_timeout\": %d, "
      .. "\"latency_p50_us\": %d, \"latency_p90_us\": %d, \"latency_p99_us\": %d, "
      .. "\"latency_max_us\": %d, \"latency_mean_us\": %.1f, \"latency_percentiles_us\": [%s]}\n",
    summary.requests, summary.duration, summary.bytes,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean, table.concat(points, ", ")))
end
