-- wrk script for benches/load.sh: one fixed request per run (built once, so wrk stays cheap).
--   wrk ... -s bench.lua URL -- get PATH    GET PATH, IMDSv2 style (with a token header)
--   wrk ... -s bench.lua URL -- put         PUT /latest/api/token with the TTL header
-- done() prints one machine-readable RESULT line (latencies in microseconds).
local TOKEN = "AQAEAEJlbmNoVXBzdHJlYW1Ub2tlbkJlbmNoVXBzdHJlYW1Ub2tlbkJl"

function init(args)
   if args[1] == "put" then
      wrk.method = "PUT"
      wrk.path = "/latest/api/token"
      wrk.headers["X-aws-ec2-metadata-token-ttl-seconds"] = "21600"
   elseif args[1] == "get" then
      wrk.method = "GET"
      wrk.path = args[2]
      wrk.headers["X-aws-ec2-metadata-token"] = TOKEN
   else
      error("usage: -- get PATH | -- put")
   end
end

function done(summary, latency)
   local e = summary.errors
   io.write(string.format(
      "RESULT requests=%d duration_us=%d rps=%.1f p50_us=%d p99_us=%d max_us=%d " ..
      "err_connect=%d err_read=%d err_write=%d err_timeout=%d err_status=%d\n",
      summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
      latency:percentile(50), latency:percentile(99), latency.max,
      e.connect, e.read, e.write, e.timeout, e.status))
end
