-- closedloop: one key's flow-control state, updated atomically in Redis.
-- A line-by-line port of closedloop/control/_core.py (KeyState); keep the two in step
-- (tests/control/test_redis.py runs the same behaviours against both).
-- KEYS[1] state hash, KEYS[2] workers zset
-- ARGV: op, now ("" = server time), limits JSON, worker id, then op arguments.
local op = ARGV[1]
local now = tonumber(ARGV[2])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local L = cjson.decode(ARGV[3])
local raw = redis.call('HGETALL', KEYS[1])
local S = {}
for i = 1, #raw, 2 do S[raw[i]] = tonumber(raw[i + 1]) end
local function g(name) return S[name] or 0 end
local CLOSED, OPEN, HALF = 0, 1, 2
local WAKE_SLACK, CATCH_UP, LANDING_OKS, LANDING_HOLD = 0.004, 0.05, 8, 1.0
local UNDER_USED, CLUMP_SHARE, OWED, LATE_MIN = 0.9, 0.05, 3, 0.001

local function count(name) S['c:' .. name] = g('c:' .. name) + 1 end

local function roll()
  local w = L.window
  local elapsed = now - g('win_start')
  if elapsed < w then return end
  if elapsed < 2 * w then S.win_prev = g('win_cur') else S.win_prev = 0 end
  S.win_cur = 0
  S.win_start = now - math.fmod(elapsed, w)
end

local function delivered()
  roll()
  local w = L.window
  local weight = 1 - (now - g('win_start')) / w
  if weight < 0 then weight = 0 end
  return (g('win_prev') * weight + g('win_cur')) / w
end

local function rate_at(t_now)
  if g('rate0') <= 0 then return L.initial_rate end
  local t = t_now - g('since')
  if t < 0 then t = 0 end
  local r
  if g('ceiling') <= 0 then
    r = g('rate0') * math.pow(L.slow_start, t)
  else
    local frac = math.min(1, g('rate0') / g('ceiling'))
    local x = t - math.pow((1 - frac) / L.cubic, 1 / 3)
    if x <= 0 then
      r = g('ceiling') * (1 + L.cubic * x * x * x)
    elseif g('measured') == 0 then
      r = g('ceiling') * math.pow(L.slow_start, x)
    else
      r = g('ceiling') * (1 + L.probe * x + L.probe_cubic * x * x * x)
    end
  end
  return math.min(L.max_rate, math.max(L.min_rate, r))
end

local function head()
  return math.max(g('last_out'), g('void_below') - 1) + 1
end

local function fill()
  local dt = now - g('last_fill')
  if dt < 0 then dt = 0 end
  if g('breaker') == CLOSED and g('hold_until') <= now then
    local r = 0.5 * (rate_at(g('last_fill')) + rate_at(now))
    local cap = g('tickets') + L.burst - 1
    S.allowed = g('allowed') + r * dt
    if g('issued') + r * dt > cap then
      S.since = g('since') + dt - math.max(0, cap - g('issued')) / r
      S.busy_since = now; S.mark_fill = now
      S.issued = cap
      S.mark_allowed = g('allowed'); S.mark_sent = g('sent'); S.mark_refused = g('refused')
    else
      S.issued = g('issued') + r * dt
    end
    local late = math.min(CATCH_UP, math.max(0, now - g('tat')))
    S.issued = math.min(g('issued'), head() + L.burst + late * r)
  end
  S.last_fill = now
end

local function restart(r)
  fill()
  S.rate0 = math.min(L.max_rate, math.max(L.min_rate, r))
  S.since = now; S.cut_at = now
end

local function void()
  S.void_below = g('tickets')
  S.issued = g('tickets') + L.burst - 1
end

local function trip(retry_after)
  S.breaker = OPEN
  S.opened_at = now
  S.open_for = math.max(L.open_for, retry_after or 0)
  void()
  count('breaker_opened')
end

-- result: wait, ticket, at, reserved, probe, reason
local result = nil

local function turn(ticket, late)
  fill()
  local r = rate_at(now)
  local short = ticket + 1 - g('issued')
  if short > 1e-9 then
    local wait = math.min(L.max_sleep, short / r)
    return {wait, ticket, now + wait, 1, 0, ''}
  end
  local early = g('tat') - now - (L.burst - 1) / r
  if early > 1e-9 then return {early, ticket, now + early, 1, 0, ''} end
  -- a late waker keeps the schedule, as far as it says it overslept (see _core.py)
  local lag = math.min(late or 0, CATCH_UP, now - g('tat'))
  if lag > 0 and g('issued') >= head() + L.burst - 1e-9 then
    S.issued = math.min(g('tickets') + L.burst - 1, g('issued') + lag * r)
  end
  S.last_out = math.max(g('last_out'), ticket)
  S.sent = g('sent') + 1
  local slack = math.max(math.min(1 / r, WAKE_SLACK), lag + 1e-9)
  if now - g('tat') < slack then S.tat = g('tat') + 1 / r
  elseif g('lateness') >= LATE_MIN and g('busy_since') <= g('tat') then
    -- slots a late caller left unused while others queued are owed (see _core.py)
    S.tat = math.max(g('tat'), now - math.min(CATCH_UP, OWED * (1 / r))) + 1 / r
  else S.tat = now + 1 / r end
  return {0, ticket, now, 1, 0, ''}
end

local function acquire()
  if g('rate0') <= 0 then
    S.rate0 = L.initial_rate
    S.since = now; S.win_start = now; S.last_fill = now; S.busy_since = now
    S.mark_fill = now
    S.issued = L.burst
  end
  if g('hold_until') > now then
    fill()
    return {g('hold_until') - now, -1, g('hold_until'), 0, 0,
            'downstream asked to wait (Retry-After)'}
  end
  if g('breaker') == OPEN then
    local reopen = g('opened_at') + g('open_for')
    if now < reopen then return {reopen - now, -1, reopen, 0, 0, 'circuit open'} end
    S.breaker = HALF; S.probes = L.half_open_probes; S.probe_at = now
  end
  if g('breaker') == HALF then
    if g('probes') <= 0 and now >= g('probe_at') + L.open_for then
      S.probes = L.half_open_probes
    end
    if g('probes') > 0 then
      S.probes = g('probes') - 1; S.probe_at = now
      count('granted')
      return {0, -1, now, 1, 1, ''}
    end
    return {L.open_for / 4, -1, now + L.open_for / 4, 0, 0, 'circuit half-open, probing'}
  end
  local ticket = g('tickets')
  S.tickets = ticket + 1
  count('granted')
  return turn(ticket, 0)
end

-- a 429 from a clump of late callers, not a sign of a rate too high (see _core.py)
local function clumped(admitted_at)
  local sent_at = rate_at(admitted_at)
  if sent_at < L.max_rate and not (sent_at > 0 and sent_at <= g('ceiling')) then
    return false
  end
  local allowed = g('allowed') + rate_at(now) * math.max(0, now - g('last_fill'))
  local given = allowed - g('mark_allowed')
  local used = g('sent') - g('mark_sent')
  if used >= UNDER_USED * given and sent_at < L.max_rate then return false end
  if g('refused') - g('mark_refused') > CLUMP_SHARE * used then return false end
  count('clumps')
  return true
end

local function feedback(signal, admitted_at, retry_after)
  count(signal)
  if signal == 'ok' or signal == 'rejected' then
    if signal == 'ok' then
      roll(); S.win_cur = g('win_cur') + 1
      if admitted_at >= g('mark_at') then S.mark_ok = g('mark_ok') + 1 end
      local took = math.max(0, now - admitted_at)
      if g('latency') <= 0 then S.latency = took
      else S.latency = g('latency') + 0.125 * (took - g('latency')) end
    end
    if g('breaker') ~= CLOSED then
      S.breaker = CLOSED; S.failures = 0
      count('breaker_closed')
      S.since = now; S.cut_at = now; S.busy_since = now; S.last_fill = now
      if g('ceiling') > 0 then S.rate0 = math.max(g('rate0'), L.backoff * g('ceiling')) end
    end
    S.failures = 0
    return
  end
  if signal == 'error' then return end
  if retry_after ~= nil and retry_after >= L.key_pause_after then
    S.hold_until = math.max(g('hold_until'), now + retry_after)
    void()
  end
  if signal == 'overloaded' then
    if admitted_at < g('cut_at') then return end
    S.refused = g('refused') + 1
    if clumped(admitted_at) then return end
    -- measured between two 429s, or an upper bound (see _core.py)
    local stop = math.min(admitted_at, now - g('latency'))
    local hold = 0
    local r
    if g('mark_at') > 0 and g('mark_ok') >= LANDING_OKS and stop > g('mark_at')
        and g('busy_since') <= g('mark_at') then
      local seen = g('mark_ok') / (stop - g('mark_at'))
      local allowed = g('allowed') + rate_at(now) * math.max(0, now - g('last_fill'))
      local given = (allowed - g('mark_allowed')) / math.max(1e-9, now - g('mark_fill'))
      local used = (g('sent') - g('mark_sent')) / math.max(1e-9, now - g('mark_fill'))
      if used >= UNDER_USED * given or g('measured') == 0 then
        S.ceiling = seen
        S.measured = 1
      end
      -- else the callers did not use the rate they were given: a lower bound (see _core.py)
      r = L.backoff * g('ceiling')
    else
      local sent = rate_at(admitted_at)
      if g('ceiling') > 0 then S.ceiling = math.min(g('ceiling'), sent) else S.ceiling = sent end
      r = L.backoff * g('ceiling')
      if g('measured') == 0 then
        r = L.first_backoff * g('ceiling')
        hold = LANDING_HOLD * g('latency')
      end
    end
    S.mark_at = admitted_at
    S.mark_ok = 0
    restart(r)
    S.mark_allowed = g('allowed'); S.mark_fill = now; S.mark_sent = g('sent')
    S.mark_refused = g('refused')
    S.since = now + hold
    count('decreases')
    return
  end
  if admitted_at >= g('cut_at') and g('breaker') == CLOSED then
    restart(L.outage_backoff * rate_at(now))
  end
  if g('breaker') == HALF then trip(retry_after); return end
  S.failures = g('failures') + 1
  if g('breaker') == CLOSED and g('failures') >= L.failure_threshold then trip(retry_after) end
end

local workers = 0
if op == 'acquire' then
  result = acquire()
elseif op == 'confirm' then
  local ticket = tonumber(ARGV[5])
  if ticket < g('void_below') or g('breaker') ~= CLOSED or g('hold_until') > now then
    count('requeued')
    result = acquire()
  else
    local late = tonumber(ARGV[6]) or 0
    if late > 0 or g('lateness') > 0 then
      S.lateness = g('lateness') + 0.125 * (late - g('lateness'))
    end
    result = turn(ticket, late)
  end
elseif op == 'feedback' then
  feedback(ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]))
end
if ARGV[4] ~= '' then
  redis.call('ZADD', KEYS[2], now, ARGV[4])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 10)
  redis.call('PEXPIRE', KEYS[2], 86400000)
  workers = redis.call('ZCARD', KEYS[2])
end
local flat = {}
local function num(v) return string.format('%.17g', v) end
for k, v in pairs(S) do flat[#flat + 1] = k; flat[#flat + 1] = num(v) end
if #flat > 0 then redis.call('HSET', KEYS[1], unpack(flat)) end
redis.call('PEXPIRE', KEYS[1], 86400000)
local r = rate_at(now)
if result == nil then return {'', '', '', '', '', '', num(r), workers} end
return {num(result[1]), num(result[2]), num(result[3]), num(result[4]), num(result[5]),
        result[6], num(r), workers}
