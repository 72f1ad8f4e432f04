-- wrk script for the soak in benches/load.sh: rotates a passthrough GET, the token PUT and the
-- role's credentials GET on every connection.
--   wrk ... -s mix.lua URL -- ROLE LIMIT [MARKER]
-- Each thread stops after LIMIT responses (0: only the -d duration bounds the run) and then
-- creates the file MARKER.<thread number>: wrk itself only returns at the end of -d, so
-- load.sh waits for every thread's marker and ends wrk early with SIGINT. Counts answers that
-- are not 2xx and bodies carrying the upstream's raw (unlocked) credentials.
-- done() prints one machine-readable RESULT line (latencies in microseconds).
local TOKEN = "AQAEAEJlbmNoVXBzdHJlYW1Ub2tlbkJlbmNoVXBzdHJlYW1Ub2tlbkJl"
local RAW_MARKER = "BENCHUPSTREAMRAW"
local threads = {}
local reqs, n, limit, marker, stopped = {}, 0, 0, nil, false

-- Globals, so done() can collect them with thread:get().
seen, non2xx, leaks, id = 0, 0, 0, 0

function setup(thread)
   table.insert(threads, thread)
   thread:set("id", #threads)
end

function init(args)
   local role = args[1] or "credlock-bench-role"
   limit = tonumber(args[2] or "0")
   marker = args[3]
   local get = { ["X-aws-ec2-metadata-token"] = TOKEN }
   reqs = {
      wrk.format("GET", "/latest/meta-data/instance-id", get),
      wrk.format("PUT", "/latest/api/token", { ["X-aws-ec2-metadata-token-ttl-seconds"] = "21600" }),
      wrk.format("GET", "/latest/meta-data/iam/security-credentials/" .. role, get),
   }
end

function request()
   n = n + 1
   return reqs[(n % #reqs) + 1]
end

function response(status, headers, body)
   seen = seen + 1
   if status < 200 or status > 299 then non2xx = non2xx + 1 end
   if body and string.find(body, RAW_MARKER, 1, true) then leaks = leaks + 1 end
   if limit > 0 and seen >= limit and not stopped then
      stopped = true
      wrk.thread:stop()
      if marker then
         local f = io.open(marker .. "." .. id, "w")
         if f then f:close() end
      end
   end
end

function done(summary, latency)
   local non2xx_total, leaks_total = 0, 0
   for _, t in ipairs(threads) do
      non2xx_total = non2xx_total + t:get("non2xx")
      leaks_total = leaks_total + t:get("leaks")
   end
   local e = summary.errors
   io.write(string.format(
      "RESULT requests=%d duration_us=%d rps=%.1f p50_us=%d p99_us=%d max_us=%d " ..
      "err_connect=%d err_read=%d err_write=%d err_timeout=%d err_status=%d non2xx=%d leaks=%d\n",
      summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
      latency:percentile(50), latency:percentile(99), latency.max,
      e.connect, e.read, e.write, e.timeout, e.status, non2xx_total, leaks_total))
end
