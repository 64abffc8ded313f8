-- wrk script for `make bench`: POSTs prepared request bodies round-robin and reports
-- requests, errors and latency percentiles as one JSON line.
--   wrk -t1 -c4 -d10s -s tests/support/wrk.lua <url> -- <folder of *.body files> <content type>
local requests = {}
local next_request = 1

function init(args)
  local folder, content_type = args[1], args[2]
  local listing = io.popen('ls "' .. folder .. '"')
  for name in listing:lines() do
    if name:match("%.body$") then
      local file = assert(io.open(folder .. "/" .. name, "rb"))
      local body = file:read("*a")
      file:close()
      requests[#requests + 1] = wrk.format("POST", nil, { ["Content-Type"] = content_type }, body)
    end
  end
  listing:close()
  assert(#requests > 0, "no .body files in " .. folder)
end

function request()
  local prepared = requests[next_request]
  next_request = next_request % #requests + 1
  return prepared
end

function done(summary, latency, _)
  local errors = summary.errors
  io.write(string.format(
    '{"requests": %d, "seconds": %.3f, "connect_errors": %d, "read_errors": %d, "write_errors": %d, '
      .. '"status_errors": %d, "timeouts": %d, "p50_ms": %.2f, "p95_ms": %.2f, "p99_ms": %.2f}\n',
    summary.requests, summary.duration / 1e6, errors.connect, errors.read, errors.write,
    errors.status, errors.timeout, latency:percentile(50) / 1e3, latency:percentile(95) / 1e3,
    latency:percentile(99) / 1e3
  ))
end
