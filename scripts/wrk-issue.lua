-- wrk script of scripts/wrk-check: POST issue requests, every one from a new user (k<thread>-<n>).
counter = 0
tid = 0
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
function request()
  counter = counter + 1
  return wrk.format(nil, nil, nil, string.format('{"user_id":"k%d-%d"}', tid, counter))
end
function done(summary, latency, requests)
  io.write(string.format("non-2xx or errors: status %d, connect %d, read %d, write %d, timeout %d\n",
    summary.errors.status, summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout))
end
