-- Argo CD health check for finetune.dev/FinetuneJob.
--
-- Argo CD runs it in Lua 5.1 with only the base, table, package and a safe os library open: no
-- `string`, no `math` (and no string methods). Everything below uses the base library, the `..`
-- operator and arithmetic (`%` is an operator, not math.fmod), so it needs no open libs.
--
--   Succeeded                                   -> Healthy
--   Failed                                      -> Degraded    "<reason>: <message>"
--   Pending waiting on a person (SecretNotFound,
--   ConfigMapNotFound, ServiceAccountNotFound,
--   PodNotStarting)                             -> Degraded    "<reason>: <message>"
--   Queued, Suspended                           -> Suspended
--   Pending, Preparing .. Uploading             -> Progressing "Training 42% (step 84/200), loss 1.23, ..."
--   no status yet / spec not yet observed       -> Progressing "Waiting for the operator ..."
local hs = {}

-- Numbers may arrive as numbers or numeric strings; anything else is nil.
local function num(v)
  if v == nil then
    return nil
  end
  return tonumber(v)
end

-- x rounded to `decimals` places (0..3), as a number; `%` rounds down without math.floor.
local function round(x, decimals)
  local scale = 1
  for _ = 1, decimals do
    scale = scale * 10
  end
  local y = x * scale + 0.5
  return (y - y % 1) / scale
end

local function two_digits(n)
  if n < 10 then
    return "0" .. tostring(n)
  end
  return tostring(n)
end

-- 37 -> "37s", 245 -> "4m05s", 3720 -> "1h02m".
local function duration(seconds)
  local s = round(seconds, 0)
  local h = (s - s % 3600) / 3600
  s = s % 3600
  local m = (s - s % 60) / 60
  s = s % 60
  if h > 0 then
    return tostring(h) .. "h" .. two_digits(m) .. "m"
  end
  if m > 0 then
    return tostring(m) .. "m" .. two_digits(s) .. "s"
  end
  return tostring(s) .. "s"
end

-- "Training 42% (step 84/200), loss 1.23, 5120 tok/s, ETA 4m05s"
local function training_message(phase, p)
  local step = num(p.step)
  local total = num(p.totalSteps)
  local percent = num(p.percent)
  if percent == nil and step ~= nil and total ~= nil and total > 0 then
    percent = step * 100 / total
    percent = percent - percent % 1
  end
  local msg = phase
  if percent ~= nil then
    msg = msg .. " " .. tostring(round(percent, 0)) .. "%"
  end
  if step ~= nil and total ~= nil then
    msg = msg .. " (step " .. tostring(step) .. "/" .. tostring(total) .. ")"
  elseif step ~= nil then
    msg = msg .. " (step " .. tostring(step) .. ")"
  end
  local parts = {}
  local loss = num(p.loss)
  if loss ~= nil then
    table.insert(parts, "loss " .. tostring(round(loss, 2)))
  end
  local tps = num(p.tokensPerSecond)
  if tps ~= nil then
    table.insert(parts, tostring(round(tps, 0)) .. " tok/s")
  end
  local eta = num(p.etaSeconds)
  if eta ~= nil and eta >= 0 then
    table.insert(parts, "ETA " .. duration(eta))
  end
  if #parts > 0 then
    msg = msg .. ", " .. table.concat(parts, ", ")
  end
  return msg
end

-- "<prefix>: <detail>", or just the prefix when there is no detail.
local function with_detail(prefix, detail)
  if detail ~= nil and detail ~= "" then
    return prefix .. ": " .. tostring(detail)
  end
  return prefix
end

local waiting_on_a_person = {
  SecretNotFound = true, ConfigMapNotFound = true, ServiceAccountNotFound = true, PodNotStarting = true,
}

local status = obj.status
local phase = nil
if status ~= nil then
  phase = status.phase
end

if phase == nil or phase == "" then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator"
  return hs
end

-- A finished run of an older spec says nothing about the spec just synced: wait until the operator
-- has started a run for the current generation (or recorded that it observed it).
local generation = nil
if obj.metadata ~= nil then
  generation = num(obj.metadata.generation)
end
local observed = num(status.observedGeneration)
if (phase == "Succeeded" or phase == "Failed") and generation ~= nil and observed ~= nil
    and observed < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to act on generation " .. tostring(generation)
  return hs
end

local progress = status.progress
if progress == nil then
  progress = {}
end

if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = with_detail("Succeeded", status.message)
elseif phase == "Failed" then
  hs.status = "Degraded"
  local reason = status.reason
  if reason == nil or reason == "" then
    reason = "Failed"
  end
  hs.message = with_detail(tostring(reason), status.message)
elseif phase == "Pending" and waiting_on_a_person[status.reason] then
  -- Nothing moves until someone creates the object or fixes the image: say so instead of spinning.
  hs.status = "Degraded"
  hs.message = with_detail(tostring(status.reason), status.message)
elseif phase == "Queued" or phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = with_detail(phase, status.message)
elseif phase == "Training" then
  hs.status = "Progressing"
  hs.message = training_message(phase, progress)
else
  -- Pending, Preparing, Exporting, Evaluating, Uploading, and any phase added later.
  hs.status = "Progressing"
  local detail = progress.message
  if detail == nil or detail == "" then
    detail = status.message
  end
  hs.message = with_detail(tostring(phase), detail)
end
return hs
