-- wrk script for bench/issuance.py: POST /1.0/sign with one pre-minted one-time token per request.
-- Environment: BENCH_BODIES (file with one JSON body per line), BENCH_THREADS (wrk -t),
-- BENCH_RESULT (file the summary is written to). Thread k sends lines k, k+T, k+2T, ... once each;
-- when a thread runs out it counts that and re-sends its first body, which the CA must refuse as a
-- replay (so running out shows up as errors, never as extra certificates).
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  local nthreads = tonumber(os.getenv("BENCH_THREADS"))
  bodies = {}
  local i = 0
  for line in io.lines(os.getenv("BENCH_BODIES")) do
    if i % nthreads == id then bodies[#bodies + 1] = line end
    i = i + 1
  end
  next_body, created, refused, exhausted = 0, 0, 0, 0
  first_created, first_refused = "", ""
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  next_body = next_body + 1
  local body = bodies[next_body]
  if body == nil then
    exhausted = exhausted + 1
    body = bodies[1]
  end
  return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
  if status == 201 then
    created = created + 1
    if first_created == "" then first_created = body end
  else
    refused = refused + 1
    if first_refused == "" then first_refused = status .. " " .. string.sub(body, 1, 300) end
  end
end

local function quote(s)
  return '"' .. string.gsub(s, '[%c"\\]', function(c) return string.format("\\u%04x", string.byte(c)) end) .. '"'
end

function done(summary, latency, requests)
  local created_all, refused_all, exhausted_all, sample, refusal = 0, 0, 0, "", ""
  for _, t in ipairs(threads) do
    created_all = created_all + t:get("created")
    refused_all = refused_all + t:get("refused")
    exhausted_all = exhausted_all + t:get("exhausted")
    if sample == "" then sample = t:get("first_created") end
    if refusal == "" then refusal = t:get("first_refused") end
  end
  local e = summary.errors
  local out = io.open(os.getenv("BENCH_RESULT"), "w")
  out:write(string.format(
    '{"created":%d,"refused":%d,"exhausted":%d,"requests":%d,"duration_us":%d,' ..
    '"p50_us":%d,"p99_us":%d,"max_us":%d,"socket_errors":%d,"sample":%s,"refusal":%s}\n',
    created_all, refused_all, exhausted_all, summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max,
    e.connect + e.read + e.write + e.timeout, quote(sample), quote(refusal)))
  out:close()
end
