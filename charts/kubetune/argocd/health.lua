-- Argo CD health check for kubetune.io/FineTuneJob (argocd-cm key:
-- resource.customizations.health.kubetune.io_FineTuneJob). It reads the kstatus conditions the operator
-- writes (kubetune/contracts.py): Ready=True -> Healthy, Stalled=True -> Degraded, phase Suspended ->
-- Suspended, anything else (Pending, Queued, Running, a status older than the spec) -> Progressing.
local hs = {status = "Progressing", message = "waiting for the kubetune operator"}
if obj.status == nil then
  return hs
end
if obj.status.message ~= nil then
  hs.message = obj.status.message
end
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and obj.status.observedGeneration ~= nil and obj.status.observedGeneration < generation then
  hs.message = "the operator has not seen the latest spec yet"
  return hs
end
local ready, stalled = nil, nil
if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    if condition.type == "Ready" then ready = condition end
    if condition.type == "Stalled" then stalled = condition end
  end
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
elseif stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
elseif obj.status.phase == "Suspended" then
  hs.status = "Suspended"
end
if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
  hs.message = ready.reason .. ": " .. ready.message
end
return hs
