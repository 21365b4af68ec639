-- Argo CD health check for finetune.dev/FinetuneSweep.
--
-- Like the FinetuneJob check, it needs only Lua 5.1's base and table libraries (Argo CD opens no
-- `string` or `math` without useOpenLibs): `..`, `tostring` and arithmetic do the formatting.
--
--   Succeeded                 -> Healthy     "3/4 trials; best lr-t2: metrics.trainLoss 0.123"
--   Failed                    -> Degraded    "<reason>: <message>"
--   Suspended                 -> Suspended
--   Pending, Running          -> Progressing "2/4 trials; best lr-t0: 0.5"
--   no status / stale spec    -> Progressing "Waiting for the operator ..."
local hs = {}

-- x rounded to 4 significant-ish decimals without math: enough for a loss or an accuracy.
local function short(x)
  local n = tonumber(x)
  if n == nil then
    return tostring(x)
  end
  local y = n * 10000 + 0.5
  return tostring((y - y % 1) / 10000)
end

local function with_detail(prefix, detail)
  if detail ~= nil and detail ~= "" then
    return prefix .. ": " .. tostring(detail)
  end
  return prefix
end

-- "3/4 trials; best lr-t2 (metrics.trainLoss 0.1234)"
local function summary(obj, status)
  local parts = {}
  if status.trialProgress ~= nil then
    table.insert(parts, tostring(status.trialProgress) .. " trials")
  end
  local best = status.bestTrial
  if best ~= nil and best.name ~= nil then
    local metric = "objective"
    if obj.spec ~= nil and obj.spec.objective ~= nil and obj.spec.objective.metric ~= nil then
      metric = tostring(obj.spec.objective.metric)
    end
    table.insert(parts, "best " .. tostring(best.name) .. " (" .. metric .. " " .. short(best.value) .. ")")
  end
  return table.concat(parts, "; ")
end

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

local generation = nil
if obj.metadata ~= nil then
  generation = tonumber(obj.metadata.generation)
end
local observed = tonumber(status.observedGeneration)
if (phase == "Succeeded" or phase == "Failed") and generation ~= nil and observed ~= nil
    and observed < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to act on generation " .. tostring(generation)
  return hs
end

local text = summary(obj, status)
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = with_detail("Succeeded", text)
elseif phase == "Failed" then
  hs.status = "Degraded"
  local reason = status.reason
  if reason == nil or reason == "" then
    reason = "Failed"
  end
  hs.message = with_detail(tostring(reason), status.message)
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = with_detail("Suspended", text)
else
  hs.status = "Progressing"
  hs.message = with_detail(tostring(phase), text)
end
return hs
