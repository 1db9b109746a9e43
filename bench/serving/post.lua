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

function done(summary, latency, requests)
  local errors = summary.errors
  -- Latencies are in microseconds; duration too.
  io.write(string.format(
    "WRK_JSON {\"requests\": %d, \"duration_us\": %d, \"bytes\": %d, "
      .. "\"errors_connect\": %d, \"errors_read\": %d, \"errors_write\": %d, "
      .. "\"errors_status\": %d, \"errors_timeout\": %d, "
      .. "\"latency_p50_us\": %d, \"latency_p90_us\": %d, \"latency_p99_us\": %d, "
      .. "\"latency_max_us\": %d, \"latency_mean_us\": %.1f}\n",
    summary.requests, summary.duration, summary.bytes,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
