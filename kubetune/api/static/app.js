// kubetune's self-serve page: sign in, pick a namespace, plan and submit a FineTuneJob, watch it live.
// Plain ES module, no framework. Every call carries the caller's own token (sessionStorage, this tab only).
'use strict';

const $ = (sel) => document.querySelector(sel);
const TOKEN_KEY = 'kubetune.token';
const state = {
  token: sessionStorage.getItem(TOKEN_KEY) || '', proxy: false, ns: '', namespaces: [],
  jobs: new Map(), sort: { key: 'created', dir: -1 }, abort: null, schema: null,
  draft: null, planned: null, job: null, events: new Map(), yamlText: null, yamlTimer: null, losses: new Map(), fullPlan: null, boots: 0, lossSource: '',
};

// --- HTTP with the caller's token -----------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, data) {
    const lines = data && Array.isArray(data.errors) ? data.errors.map(String)
      : [data && data.detail ? (typeof data.detail === 'string' ? data.detail : JSON.stringify(data.detail))
        : `HTTP ${status}`];
    super(lines.join('\n'));
    this.status = status;
    this.lines = lines;
  }
}

function headers(extra = {}) {
  const h = { Accept: 'application/json', ...extra };
  if (state.token) h.Authorization = `Bearer ${state.token}`;
  return h;
}

async function api(method, path, body) {
  const init = { method, headers: headers(body === undefined ? {} : { 'Content-Type': 'application/json' }),
    credentials: 'same-origin', cache: 'no-store' };
  if (body !== undefined) init.body = JSON.stringify(body);
  const res = await fetch(path, init);
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { detail: text }; }
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

const nsPath = (ns) => `/v1/namespaces/${encodeURIComponent(ns)}`;
const jobPath = (ns, name) => `${nsPath(ns)}/finetunejobs/${encodeURIComponent(name)}`;

// --- Server-Sent Events over fetch (EventSource cannot send the Authorization header) --------------------

function parseBlock(block) {
  const msg = { event: 'message', data: [], id: null };
  for (const line of block.split('\n')) {
    if (!line || line.startsWith(':')) continue;  // a comment: the heartbeat
    const at = line.indexOf(':');
    const field = at < 0 ? line : line.slice(0, at);
    let value = at < 0 ? '' : line.slice(at + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') msg.event = value;
    else if (field === 'data') msg.data.push(value);
    else if (field === 'id') msg.id = value;
  }
  return msg;
}

// Reads `path` as an event stream until `signal` aborts; reconnects with Last-Event-ID after a drop.
async function stream(path, onMessage, onState, signal) {
  let lastId = null;
  let wait = 500;
  while (!signal.aborted) {
    try {
      const res = await fetch(path, { headers: headers({ Accept: 'text/event-stream',
        ...(lastId ? { 'Last-Event-ID': lastId } : {}) }), signal, cache: 'no-store' });
      if (!res.ok || !res.body) {
        const err = new ApiError(res.status, await res.json().catch(() => null));
        if (res.status < 500) { onState('failed', err); return; }
        throw err;
      }
      onState('live');
      wait = 500;
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer = (buffer + value).replace(/\r\n?/g, '\n');
        let end;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          const msg = parseBlock(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (msg.id !== null) lastId = msg.id;
          if (msg.data.length) onMessage(msg.event, JSON.parse(msg.data.join('\n')));
        }
      }
    } catch (err) {
      if (signal.aborted) return;
    }
    onState('reconnecting');
    await new Promise((r) => setTimeout(r, wait));
    wait = Math.min(wait * 2, 10000);
  }
}

function watch(path, onMessage, statusText) {
  if (state.abort) state.abort.abort();
  state.abort = new AbortController();
  stream(path, onMessage, (s, err) => {
    say(s === 'live' ? `${statusText}: live` : s === 'failed' ? `Live updates refused: ${err.message}`
      : `${statusText}: reconnecting…`);
  }, state.abort.signal);
}

// --- small helpers ---------------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'text') node.textContent = v; else node.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat(Infinity)) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function say(text) { $('#status').textContent = text; }
const gib = (bytes) => `${(bytes / 2 ** 30).toFixed(1)} GiB`;
const money = (x) => (x === null || x === undefined ? '–' : `$${Number(x).toFixed(2)}`);

function duration(seconds) {
  if (seconds === null || seconds === undefined) return '–';
  const s = Math.max(0, Math.round(seconds));
  if (s < 90) return `${s} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

function age(stamp) {
  if (!stamp) return '';
  return duration((Date.now() - Date.parse(stamp)) / 1000);
}

function show(view) {
  for (const v of document.querySelectorAll('.view')) v.hidden = v.id !== `view-${view}`;
}

// --- sign in and namespaces ------------------------------------------------------------------------------

async function signIn() {
  try {
    const data = await api('GET', '/v1/namespaces');
    const items = Array.isArray(data) ? data : (data && (data.items || data.namespaces)) || [];
    state.namespaces = items.map((x) => (typeof x === 'string' ? x : x.name || (x.metadata || {}).name))
      .filter(Boolean);
    if (data && data.message) say(data.message);
  } catch (err) {
    if (err.status === 401) return false;
    if (err.status !== 404 || !state.token) throw err;
    state.namespaces = [];  // an API without the namespace list: type the namespace
  }
  $('#ns-list').replaceChildren(...state.namespaces.map((n) => el('option', { value: n })));
  $('#ns-form').hidden = false;
  $('#sign-out').hidden = !state.token;  // behind a proxy: sign out there
  return true;
}

async function boot() {
  const run = ++state.boots;  // a later boot (a sign-in while the first probe is out) wins
  if (!state.token) {  // behind an OIDC proxy the header is set for us: try without a token first
    const proxied = await signIn().catch(() => false);
    if (run !== state.boots) return undefined;
    state.proxy = proxied;
    return proxied ? route() : showSignIn('');
  }
  let failure = 'This token was not accepted (401). Paste a valid one.';
  const ok = await signIn().catch((err) => { failure = err.message; return false; });
  if (run !== state.boots) return undefined;
  return ok ? route() : showSignIn(failure);
}

function showSignIn(message) {
  if (state.abort) { state.abort.abort(); state.abort = null; }
  state.token = '';
  sessionStorage.removeItem(TOKEN_KEY);
  $('#ns-form').hidden = true;
  $('#sign-out').hidden = true;
  $('#signin-error').textContent = message || '';
  show('signin');
  $('#token-input').focus();
}

// --- the job list ----------------------------------------------------------------------------------------

function summaryOf(item) {
  if (!item) return null;
  if (item.summary) return item.summary;
  if (!item.metadata) return item;
  const st = item.status || {};
  return { name: item.metadata.name, namespace: item.metadata.namespace, phase: st.phase, gpu: st.gpu,
    vram: st.vram, step: st.step, loss: st.loss, adapterUri: st.adapterUri, message: st.message,
    created: item.metadata.creationTimestamp };
}

const COLUMNS = ['name', 'phase', 'gpu', 'vram', 'step', 'loss', 'created'];

function renderJobs() {
  const { key, dir } = state.sort;
  const rows = [...state.jobs.values()].sort((a, b) => {
    const x = a[key] ?? '';
    const y = b[key] ?? '';
    const nx = Number.parseFloat(x);
    const ny = Number.parseFloat(y);
    const cmp = key !== 'created' && key !== 'name' && !Number.isNaN(nx) && !Number.isNaN(ny) ? nx - ny
      : String(x).localeCompare(String(y));
    return cmp * dir;
  });
  for (const th of document.querySelectorAll('#jobs-table th')) {
    th.setAttribute('aria-sort', th.dataset.key === key ? (dir > 0 ? 'ascending' : 'descending') : 'none');
  }
  $('#jobs-table tbody').replaceChildren(...rows.map((j) => el('tr', {},
    el('td', {}, el('a', { href: `#/ns/${state.ns}/jobs/${j.name}`, text: j.name })),
    ...COLUMNS.slice(1).map((c) => el('td', { 'data-col': c, text: c === 'created' ? age(j.created) : j[c] ?? '' })))));
  $('#jobs-empty').hidden = rows.length > 0;
}

function onNamespaceEvent(kind, data) {
  if (kind === 'snapshot') {
    state.jobs = new Map();
    for (const item of data.items || []) {
      const s = summaryOf(item);
      if (s && s.name) state.jobs.set(s.name, s);
    }
  } else if (kind === 'job') {
    const s = summaryOf(data.summary ? data : data.resource);
    if (!s || !s.name) return;
    if (data.type === 'DELETED') state.jobs.delete(s.name); else state.jobs.set(s.name, s);
  } else return;
  renderJobs();
}

async function showJobs(ns) {
  show('jobs');
  $('#jobs-title').textContent = `Jobs in ${ns}`;
  $('#new-job-link').href = `#/ns/${ns}/new`;
  $('#jobs-error').textContent = '';
  state.jobs = new Map();
  renderJobs();
  try {
    for (const s of await api('GET', `${nsPath(ns)}/finetunejobs`)) state.jobs.set(s.name, s);
    renderJobs();
  } catch (err) {
    $('#jobs-error').textContent = refusal(err, ns);
    for (const id of ['#jobs-table', '#jobs-empty', '#new-job-link', '#quota']) $(id).hidden = true;
    return;
  }
  $('#jobs-table').hidden = false;
  $('#new-job-link').hidden = false;
  showQuota(ns);
  watch(`${nsPath(ns)}/events`, onNamespaceEvent, `Jobs in ${ns}`);
}

function refusal(err, ns) {
  if (err.status === 403) return `Refused: you may not use the namespace "${ns}" (${err.message}).`;
  if (err.status === 401) return 'Your token is no longer accepted: sign in again.';
  return err.message;
}

async function showQuota(ns) {
  let quota;
  try { quota = await api('GET', `${nsPath(ns)}/quota`); } catch { $('#quota').hidden = true; return; }
  const limits = quota.limits || {};
  const usage = quota.usage || {};
  const of = (used, limit) => `${used ?? 0} of ${limit ?? 'no limit'}`;
  const rows = [
    ['Running or queued jobs', of(usage.concurrentJobs, limits.maxConcurrentJobs)],
    ['GPUs in use', of(usage.gpus, limits.maxGpus)],
    ['GPU classes allowed', limits.allowedGpuClasses ? limits.allowedGpuClasses.join(', ') : 'any'],
    ['Estimated cost per job', limits.maxEstimatedCost ? `at most ${money(limits.maxEstimatedCost)}` : 'no limit'],
  ];
  for (const q of (quota.kueue && quota.kueue.localQueues) || []) {
    const cq = q.clusterQueueStatus || {};
    rows.push([`Kueue queue ${q.name}`, `ClusterQueue ${q.clusterQueue}: ${cq.admittedWorkloads ?? 0} admitted, `
      + `${cq.pendingWorkloads ?? 0} pending${q.message ? ` (${q.message})` : ''}`]);
  }
  $('#quota-list').replaceChildren(...rows.flatMap(([k, v]) => [el('dt', { text: k }), el('dd', { text: v })]));
  $('#quota').hidden = false;
}

// --- the form generated from the JSON schema ---------------------------------------------------------------

async function loadSchema() {
  if (state.schema) return state.schema;
  let schema;
  try {
    schema = await api('GET', '/v1/schema/finetunejob');
  } catch {
    const openapi = await api('GET', '/openapi.json');  // an API without the schema route: the same model
    const defs = openapi.components.schemas;
    schema = { ...defs.FineTuneJob, $defs: defs };
  }
  if (!(schema.properties || {}).spec) {  // the spec's schema: the job around it is metadata.name + spec
    const { $defs, ...spec } = schema;
    schema = { $defs: $defs || {}, properties: { metadata: { properties: { name: { type: 'string',
      description: "The job's name: lowercase letters, digits and '-'" } } }, spec } };
  }
  state.schema = schema;
  return schema;
}

function resolve(node, root) {
  let n = node;
  while (n && n.$ref) n = root.$defs[n.$ref.split('/').pop()] || {};
  if (n && n.anyOf) {
    const real = n.anyOf.filter((x) => x.type !== 'null');
    if (real.length === 1) return { ...resolve(real[0], root), description: n.description || real[0].description };
  }
  return n || {};
}

const SKIP = new Set(['apiVersion', 'kind', 'status', 'metadata.namespace']);
const fieldId = (path) => `f-${path.replace(/[^a-zA-Z0-9]+/g, '-')}`;

function fields(node, path, root) {
  const out = [];
  for (const [key, raw] of Object.entries(node.properties || {})) {
    const p = path ? `${path}.${key}` : key;
    if (SKIP.has(p)) continue;
    const s = resolve(raw, root);
    if (s.properties) {
      out.push(el('fieldset', { 'data-path': p }, el('legend', { text: p }), fields(s, p, root)));
    } else {
      out.push(leaf(p, key, s, raw));
    }
  }
  return out;
}

function leaf(path, key, s, raw) {
  const id = fieldId(path);
  const help = s.description || raw.description;
  const describedBy = help ? `${id}-help` : null;
  let input;
  if (s.enum || s.type === 'boolean') {
    const options = s.enum || [true, false];
    input = el('select', { id, 'data-path': path, 'data-type': s.type === 'boolean' ? 'boolean' : 'string' },
      el('option', { value: '', text: '(default)' }), options.map((o) => el('option', { value: String(o), text: String(o) })));
  } else {
    const numeric = s.type === 'integer' || s.type === 'number';
    const simple = numeric || s.type === 'string';
    input = el('input', { id, 'data-path': path, type: numeric ? 'number' : 'text', step: numeric ? 'any' : null,
      'data-type': simple ? s.type : 'json', spellcheck: 'false', autocomplete: 'off',
      placeholder: s.default !== undefined && s.default !== null ? `default: ${JSON.stringify(s.default)}` : null });
  }
  if (describedBy) input.setAttribute('aria-describedby', describedBy);
  if (path === 'spec.model.name') input.setAttribute('list', 'model-list');  // the known architectures
  return el('div', { class: 'field' }, el('label', { for: id, text: key }), input,
    help ? el('small', { id: describedBy, class: 'help', text: help }) : []);
}

function getPath(obj, path) {
  return path.split('.').reduce((o, k) => (o && typeof o === 'object' ? o[k] : undefined), obj);
}

function setPath(obj, path, value) {
  const keys = path.split('.');
  let o = obj;
  for (const k of keys.slice(0, -1)) {
    if (typeof o[k] !== 'object' || o[k] === null) o[k] = {};
    o = o[k];
  }
  if (value === undefined) delete o[keys.at(-1)]; else o[keys.at(-1)] = value;
}

function readInput(input) {
  const v = input.value.trim();
  if (v === '') return undefined;
  const type = input.dataset.type;
  if (type === 'integer' || type === 'number') return Number(v);
  if (type === 'boolean') return v === 'true';
  if (type === 'json') { try { return JSON.parse(v); } catch { return v; } }
  return input.value;
}

function fillForm() {
  for (const input of document.querySelectorAll('#fields [data-path]:is(input, select)')) {
    const v = getPath(state.draft, input.dataset.path);
    input.value = v === undefined || v === null ? '' : typeof v === 'object' ? JSON.stringify(v) : String(v);
  }
}

function draftChanged() {
  state.planned = null;
  $('#submit-button').disabled = true;
  $('#plan').hidden = true;
}

function onFieldInput(event) {
  const input = event.target;
  if (!input.dataset || !input.dataset.path) return;
  setPath(state.draft, input.dataset.path, readInput(input));
  state.yamlText = window.jsyaml.dump(state.draft, { lineWidth: 120 });
  $('#yaml-input').value = state.yamlText;
  draftChanged();
}

function onYamlInput() {
  clearTimeout(state.yamlTimer);
  const text = $('#yaml-input').value;
  if (text === state.yamlText) return true;  // unchanged since last read: keep the plan
  state.yamlText = text;
  try {
    const doc = window.jsyaml.load(text);
    if (!doc || typeof doc !== 'object' || Array.isArray(doc)) throw new Error('a FineTuneJob is a mapping');
    state.draft = doc;
    $('#yaml-error').textContent = '';
    fillForm();
    return true;
  } catch (err) {
    $('#yaml-error').textContent = `YAML: ${err.message.split('\n')[0]}`;
    return false;
  } finally {
    draftChanged();
  }
}

const TEMPLATE = { apiVersion: 'kubetune.io/v1alpha1', kind: 'FineTuneJob', metadata: { name: '' },
  spec: { model: { name: '' }, dataset: { source: '', format: 'chat' }, method: 'qlora', output: { uri: '' } } };

// What the planner sees: the catalog with the cluster's free GPUs, and the models it knows by name.
async function showCatalog() {
  if (!$('#gpus').hidden) return;
  try {
    const gpus = await api('GET', '/v1/gpus');
    const known = (x) => (x === null || x === undefined ? 'unknown' : String(x));
    $('#gpus-table tbody').replaceChildren(...(gpus.classes || []).map((g) => el('tr', {},
      el('th', { scope: 'row', text: g.name }), el('td', { text: `${g.memoryGiB} GiB` }),
      el('td', { text: money(g.hourlyPrice) }), el('td', { text: known(g.nodes) }),
      el('td', { text: known(g.freeGpus) }))));
    $('#gpus-note').textContent = gpus.message || (gpus.inventory ? "Free GPUs from the cluster's nodes."
      : 'The whole catalog (no node inventory).');
    $('#gpus').hidden = false;
  } catch { /* an API without the catalog route: the plan still says what it chose */ }
  try {
    const models = await api('GET', '/v1/models');
    $('#model-list').replaceChildren(...(models.items || []).map((m) => el('option', { value: m.name })));
  } catch { /* no suggestions */ }
}

async function showNew(ns) {
  show('new');
  $('#new-title').textContent = `New job in ${ns}`;
  clearErrors();
  if (!$('#fields').children.length) {
    const schema = await loadSchema();
    $('#fields').replaceChildren(...fields(schema, '', schema));
  }
  if (!state.draft) {
    state.draft = structuredClone(TEMPLATE);
    state.yamlText = window.jsyaml.dump(state.draft, { lineWidth: 120 });
    $('#yaml-input').value = state.yamlText;
  }
  fillForm();  // the fields may have come after a file or a paste did
  draftChanged();
  showCatalog();
}

function body(ns) {
  const job = structuredClone(state.draft);
  job.metadata = { ...(job.metadata || {}), namespace: ns };
  return job;
}

// --- errors beside the fields they name ------------------------------------------------------------------

function clearErrors() {
  for (const e of document.querySelectorAll('.field-error')) e.remove();
  for (const i of document.querySelectorAll('[aria-invalid]')) {
    i.removeAttribute('aria-invalid');
    const ids = (i.getAttribute('aria-describedby') || '').split(' ').filter((x) => x && !x.endsWith('-err'));
    if (ids.length) i.setAttribute('aria-describedby', ids.join(' ')); else i.removeAttribute('aria-describedby');
  }
  $('#form-errors').replaceChildren();
}

function placeError(line) {
  let path = line.split(': ')[0].trim();
  while (path) {
    const target = document.querySelector(`#fields [data-path="${CSS.escape(path)}"]`);
    if (target) {
      const id = `${fieldId(path)}-err`;
      let note = document.getElementById(id);
      if (!note) {
        note = el('p', { id, class: 'field-error' });
        if (target.tagName === 'FIELDSET') target.querySelector('legend').after(note);
        else target.after(note);
        const ids = (target.getAttribute('aria-describedby') || '').split(' ').filter(Boolean);
        target.setAttribute('aria-describedby', [...ids, id].join(' '));
        target.setAttribute('aria-invalid', 'true');
      }
      note.append(el('span', { text: line }));
      return id;
    }
    path = path.includes('.') ? path.slice(0, path.lastIndexOf('.')) : '';
  }
  return null;
}

function showErrors(err, ns) {
  clearErrors();
  const box = $('#form-errors');
  if (err.status === 403 || err.status === 429) {
    box.append(el('p', { text: err.status === 403 && !/quota|limit/i.test(err.message) ? refusal(err, ns)
      : `Refused by quota: ${err.message}` }));
    return;
  }
  const items = err.lines.map((line) => {
    const id = err.status === 422 ? placeError(line) : null;
    const target = id ? document.getElementById(id).previousElementSibling : null;
    return el('li', {}, target && target.id ? el('a', { href: `#${target.id}`, 'data-focus': target.id, text: line })
      : line);
  });
  box.append(el('p', { text: err.status === 422 ? 'The job is not valid:' : `Error ${err.status}:` }), el('ul', {}, items));
  const first = $('#job-form [aria-invalid="true"]');
  if (first) {  // bring the first bad field into the form's own scroll area (the page stays where it is)
    const form = $('#job-form');
    form.scrollTop += first.getBoundingClientRect().top - form.getBoundingClientRect().top - 60;
  }
}

// --- the plan --------------------------------------------------------------------------------------------

const PARTS = ['base_weights', 'quant_constants', 'lora_weights', 'lora_gradients', 'optimizer_states',
  'activations', 'logits', 'cuda_overhead'];

function estimateBar(plan) {
  const parts = Object.entries(plan.breakdown || {}).filter(([, v]) => v > 0)
    .sort((a, b) => PARTS.indexOf(a[0]) - PARTS.indexOf(b[0]));
  const total = parts.reduce((t, [, v]) => t + v, 0) || 1;
  const label = `VRAM estimate per GPU ${gib(plan.vramEstimateBytes)}: ${parts.map(([k, v]) => `${k} ${gib(v)}`).join(', ')}`;
  return el('div', { class: 'estimate' },
    el('div', { class: 'bar', role: 'img', 'aria-label': label },
      parts.map(([k, v], i) => el('span', { class: `part p${i % 8}`, style: null, 'data-width': (100 * v / total).toFixed(2), title: `${k}: ${gib(v)}` }))),
    el('ul', { class: 'legend' }, parts.map(([k, v], i) => el('li', {}, el('span', { class: `swatch p${i % 8}`, 'aria-hidden': 'true' }), `${k.replaceAll('_', ' ')} ${gib(v)}`))));
}

function sizeBars(root) {  // widths from data attributes: the page's CSP allows no inline style attribute
  for (const part of root.querySelectorAll('[data-width]')) part.style.width = `${part.dataset.width}%`;
}

function shapesTable(plan) {
  const steps = plan.estimatedHours;
  const chosen = { gpuClass: plan.gpuClass, gpuCount: plan.gpuCount, strategy: plan.strategy, nodes: plan.nodes,
    hourlyCost: plan.hourlyCost, vramEstimateBytes: plan.vramEstimateBytes, jobCostRatio: 1, timeRatio: 1,
    kind: 'chosen', note: '' };
  const rows = [chosen, ...(plan.alternatives || [])];
  return el('div', { class: 'scroll', tabindex: 0, role: 'region', 'aria-label': 'Shapes compared' }, el('table', { class: 'shapes' },
    el('caption', { text: `Shapes compared (per job: ${plan.estimatedFor})` }),
    el('thead', {}, el('tr', {}, ['Shape', 'Strategy', 'VRAM per GPU', 'Per hour', 'Per job', 'Time', 'Note']
      .map((h) => el('th', { scope: 'col', text: h })))),
    el('tbody', {}, rows.map((r) => el('tr', { class: r.kind === 'chosen' ? 'chosen' : null },
      el('th', { scope: 'row', text: `${r.gpuClass} × ${r.gpuCount}${r.nodes > 1 ? `, ${r.nodes} nodes` : ''}` }),
      el('td', { text: r.strategy || '' }), el('td', { text: r.vramEstimateBytes ? gib(r.vramEstimateBytes) : '–' }),
      el('td', { text: money(r.hourlyCost) }),
      el('td', { text: r.jobCostRatio ? money(plan.estimatedCost * r.jobCostRatio) : '–' }),
      el('td', { text: r.timeRatio ? duration(steps * r.timeRatio * 3600) : '–' }),
      el('td', { text: r.kind === 'chosen' ? 'chosen' : r.note || r.kind || '' })))),
  ));
}

// The full plan (POST /v1/plan, a submission's answer) or the part the operator keeps in status.plan.
function renderPlan(plan) {
  const knobs = Object.entries(plan.knobs || {});
  const costed = Number.isFinite(plan.hourlyCost) && Number.isFinite(plan.estimatedHours);
  const node = el('div', { class: 'plan' },
    el('p', { class: 'headline' }, el('strong', { class: 'gpu-class', text: `${plan.gpuClass} × ${plan.gpuCount}` }),
      ` ${plan.strategy || 'single'}${plan.nodes > 1 ? ` over ${plan.nodes} nodes` : ''}`,
      plan.vramEstimateBytes ? ` · ${gib(plan.vramEstimateBytes)} per GPU` : '',
      costed ? ` · ${money(plan.hourlyCost)}/h · about ${duration(plan.estimatedHours * 3600)} and `
        + `${money(plan.estimatedCost)} for ${plan.estimatedFor}` : ''),
    plan.breakdown ? [el('h3', { text: 'VRAM estimate' }), estimateBar(plan)] : [],
    el('h3', { text: 'Knobs' }), el('dl', { class: 'kv' }, knobs.map(([k, v]) => [el('dt', { text: k }), el('dd', { text: String(v) })])),
    el('h3', { text: 'Why' }), el('ul', { class: 'reasons' }, (plan.reasons || []).map((r) => el('li', { text: r }))),
    costed ? shapesTable(plan) : []);
  sizeBars(node);
  return node;
}

async function doPlan(ns) {
  clearErrors();
  $('#plan-button').disabled = true;
  say('Planning…');
  try {
    const plan = await api('POST', '/v1/plan', body(ns));
    state.planned = plan;
    $('#plan-body').replaceChildren(renderPlan(plan));
    $('#plan').hidden = false;
    $('#submit-button').disabled = false;
    say(`Planned: ${plan.gpuClass} × ${plan.gpuCount}`);
  } catch (err) {
    showErrors(err, ns);
    say('The plan failed: see the errors');
  } finally {
    $('#plan-button').disabled = false;
  }
}

async function doSubmit(ns) {
  clearErrors();
  $('#submit-button').disabled = true;
  try {
    const created = await api('POST', `${nsPath(ns)}/finetunejobs`, body(ns));
    state.draft = null;
    // the full plan (costs, shapes) for this tab's job page; the operator keeps a shorter one in status.plan
    sessionStorage.setItem(`kubetune.plan:${ns}/${created.summary.name}`, JSON.stringify(created.plan));
    say(`Submitted ${created.summary.name}`);
    location.hash = `#/ns/${ns}/jobs/${created.summary.name}`;
  } catch (err) {
    showErrors(err, ns);
    $('#submit-button').disabled = false;
    say('Not submitted: see the errors');
  }
}

// --- one job, live ---------------------------------------------------------------------------------------

function lossChart(points) {
  const pts = (points || []).filter((p) => Number.isFinite(p.step) && Number.isFinite(p.loss));
  if (!pts.length) return el('p', { text: 'No loss yet.' });
  const W = 600; const H = 220; const L = 48; const B = 28; const T = 10; const R = 12;
  const xs = pts.map((p) => p.step); const ys = pts.map((p) => p.loss);
  const x0 = Math.min(...xs); const x1 = Math.max(...xs, x0 + 1);
  const y0 = Math.min(...ys); const y1 = Math.max(...ys, y0 + 1e-9);
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const ns = 'http://www.w3.org/2000/svg';
  const svg = (tag, attrs, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
    if (text !== undefined) n.textContent = text;
    return n;
  };
  const last = pts.at(-1);
  const root = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', class: 'loss', id: 'loss-svg',
    'aria-label': `Training loss over ${pts.length} logged steps: ${pts[0].loss.toFixed(3)} at step ${pts[0].step}, ${last.loss.toFixed(3)} at step ${last.step}` });
  root.append(svg('line', { x1: L, y1: H - B, x2: W - R, y2: H - B, class: 'axis' }),
    svg('line', { x1: L, y1: T, x2: L, y2: H - B, class: 'axis' }),
    svg('text', { x: L - 6, y: T + 10, 'text-anchor': 'end' }, y1.toFixed(2)),
    svg('text', { x: L - 6, y: H - B, 'text-anchor': 'end' }, y0.toFixed(2)),
    svg('text', { x: L, y: H - 8, 'text-anchor': 'start' }, `step ${x0}`),
    svg('text', { x: W - R, y: H - 8, 'text-anchor': 'end' }, `step ${x1}`),
    svg('polyline', { points: pts.map((p) => `${px(p.step).toFixed(1)},${py(p.loss).toFixed(1)}`).join(' '), class: 'curve' }),
    ...pts.map((p) => svg('circle', { cx: px(p.step).toFixed(1), cy: py(p.loss).toFixed(1), r: 3, class: 'dot' })));
  return root;
}

function renderJob(obj) {
  state.job = obj;
  const st = obj.status || {};
  const spec = obj.spec || {};
  const progress = st.progress || {};
  $('#job-phase').textContent = st.phase || 'Pending';
  $('#job-phase').dataset.phase = st.phase || '';
  $('#job-message').textContent = st.message || '';
  const total = progress.totalSteps || 0;
  const step = progress.step || 0;
  const pct = progress.percent ?? (total ? Math.floor((100 * step) / total) : 0);
  $('#job-progress').value = st.phase === 'Succeeded' ? 100 : pct;
  $('#job-progress').setAttribute('aria-valuetext', `step ${step} of ${total || '?'}`);
  $('#job-progress-text').textContent = total || step ? `step ${step}/${total || '?'} · ${pct}%`
    + `${progress.etaSeconds !== undefined && progress.etaSeconds !== null && st.phase === 'Running' ? ` · ETA ${duration(progress.etaSeconds)}` : ''}`
    + `${progress.loss !== undefined && progress.loss !== null ? ` · loss ${Number(progress.loss).toFixed(4)}` : ''}` : 'not started';
  // the operator's bounded history, plus every step this page saw live (a page left open keeps them all)
  for (const p of st.lossHistory || []) state.losses.set(p.step, p.loss);
  if (Number.isFinite(progress.step) && Number.isFinite(progress.loss) && st.phase !== 'Succeeded') {
    state.losses.set(progress.step, progress.loss);
  }
  const points = [...state.losses].map(([step, loss]) => ({ step, loss })).sort((a, b) => a.step - b.step);
  $('#loss-chart').replaceChildren(lossChart(points));
  $('#loss-source').textContent = state.lossSource || '';
  const adapter = $('#adapter-list');
  adapter.replaceChildren();
  if (st.adapterUri) {
    const base = st.adapterUri.replace(/\/+$/, '');
    adapter.append(el('dt', { text: 'URI' }), el('dd', {}, el('code', { id: 'adapter-uri', text: st.adapterUri })),
      el('dt', { text: 'Manifest' }), el('dd', {}, el('code', { text: `${base}/manifest.json` }),
        ' (each file with its sha256 and size)'));
    if (st.modelCommit) adapter.append(el('dt', { text: 'Base model commit' }), el('dd', {}, el('code', { text: st.modelCommit })));
    const manifest = st.adapterManifest || st.manifest;
    if (manifest && manifest.files) {
      adapter.append(el('dt', { text: 'Files' }), el('dd', {}, el('ul', {}, Object.entries(manifest.files).map(([f, e]) =>
        el('li', {}, el('code', { text: f }), ` ${e.bytes} bytes, sha256 ${String(e.sha256).slice(0, 12)}…`)))));
    }
  }
  $('#adapter').hidden = !st.adapterUri;
  const full = state.fullPlan;  // what the submission answered; a re-plan (OOM escalation) replaces it
  const plan = !(st.plan && st.plan.gpuClass) ? full
    : full && full.gpuClass === st.plan.gpuClass && full.gpuCount === st.plan.gpuCount ? full : st.plan;
  if (plan && typeof plan === 'object' && plan.gpuClass) $('#job-plan').replaceChildren(renderPlan(plan));
  $('#attempts-table tbody').replaceChildren(...(st.attempts || []).map((a) => el('tr', {},
    el('td', { text: a.attempt ?? '' }), el('td', { text: a.gpuClass || '' }), el('td', { text: a.outcome || '' }),
    el('td', { text: a.resumedFromStep ?? '' }), el('td', { text: a.startedAt || '' }), el('td', { text: a.message || '' }))));
  const terminal = ['Succeeded', 'Failed'].includes(st.phase);
  $('#suspend-button').disabled = terminal || Boolean(spec.suspend);
  $('#delete-button').disabled = false;
  $('#resume-button').disabled = terminal || !spec.suspend;
}

// The curve the API serves (Prometheus when it is configured with one, else status.lossHistory).
async function loadLoss(ns, name) {
  try {
    const curve = await api('GET', `${jobPath(ns, name)}/loss`);
    for (const p of curve.points || []) state.losses.set(p.step, p.loss);
    state.lossSource = `${curve.source === 'prometheus' ? 'From Prometheus' : "From the job's status"}`
      + `${curve.message ? ` (${curve.message})` : ''}, and live.`;
  } catch {
    state.lossSource = "From the job's status, and live.";
  }
  if (state.job) renderJob(state.job);
}

function renderEvents() {
  const items = [...state.events.values()].sort((a, b) => String(a.time).localeCompare(String(b.time)));
  $('#events-list').replaceChildren(...items.map((e) => el('li', { class: e.type === 'Warning' ? 'warning' : null },
    el('time', { datetime: e.time || null, text: e.time ? new Date(e.time).toLocaleTimeString() : '' }), ' ',
    el('strong', { text: e.reason || '' }),
    e.count > 1 ? ` (×${e.count})` : '', ` ${e.message || ''}`)));
}

function onJobEvent(kind, data) {
  if (kind === 'job') {
    if (data.type === 'DELETED') {
      say('This job was deleted.');
      $('#job-phase').textContent = 'Deleted';
      for (const verb of JOB_BUTTONS) $(`#${verb}-button`).disabled = true;
      return;
    }
    if (data.resource) renderJob(data.resource);
  } else if (kind === 'kevent') {
    state.events.set(`${data.reason}|${data.message}`, data);  // a repeat bumps its count: one line
    renderEvents();
  } else if (kind === 'snapshot') {
    for (const item of data.items || []) if (item.resource) renderJob(item.resource);
    for (const e of data.kevents || []) state.events.set(`${e.reason}|${e.message}`, e);
    renderEvents();
  }
}

const JOB_BUTTONS = ['suspend', 'resume', 'delete'];

async function showJob(ns, name) {
  show('job');
  // the buttons act on state.job: until this job has loaded they would act on the one shown before (or on none)
  state.job = null;
  for (const verb of JOB_BUTTONS) $(`#${verb}-button`).disabled = true;
  $('#job-title').textContent = name;
  $('#job-error').textContent = '';
  state.events = new Map();
  state.losses = new Map();
  state.lossSource = '';
  renderEvents();
  try {
    const got = await api('GET', jobPath(ns, name));
    const submitted = JSON.parse(sessionStorage.getItem(`kubetune.plan:${ns}/${name}`) || 'null');
    state.fullPlan = submitted && submitted.gpuClass ? submitted : null;
    renderJob(got.resource);
  } catch (err) {
    $('#job-error').textContent = refusal(err, ns);
    return;
  }
  await loadLoss(ns, name);
  watch(`${jobPath(ns, name)}/events`, onJobEvent, name);
}

async function act(verb) {
  const [ns, name] = [state.ns, state.job.metadata.name];
  if (verb === 'delete' && !window.confirm(`Delete ${name}? Its pods stop; the S3 output stays.`)) return;
  $('#job-error').textContent = '';
  try {
    if (verb === 'delete') {
      await api('DELETE', jobPath(ns, name));
      location.hash = `#/ns/${ns}`;
      say(`Deleting ${name}`);
      return;
    }
    await api('POST', `${jobPath(ns, name)}/${verb}`);
    // the buttons follow at once; the phase comes from the stream (the operator's answer), never from this
    // reply, which may be older than a transition the stream has already shown
    state.job.spec = { ...state.job.spec, suspend: verb === 'suspend' };
    renderJob(state.job);
    say(`${verb === 'suspend' ? 'Suspended' : 'Resumed'} ${name}`);
  } catch (err) {
    $('#job-error').textContent = refusal(err, ns);
  }
}

// --- routing ---------------------------------------------------------------------------------------------

async function route() {
  if (!state.token && !state.proxy) return showSignIn('');
  if (state.abort) { state.abort.abort(); state.abort = null; }
  const parts = location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
  const ns = parts[0] === 'ns' ? parts[1] : state.namespaces[0];
  say('');
  if (!ns) { show('jobs'); $('#jobs-title').textContent = 'Pick a namespace'; $('#ns-input').focus(); return; }
  state.ns = ns;
  $('#ns-input').value = ns;
  try {
    if (parts[2] === 'new') await showNew(ns);
    else if (parts[2] === 'jobs' && parts[3]) await showJob(ns, parts[3]);
    else await showJobs(ns);
  } catch (err) {
    say(err.message);
  }
  $('#main').focus({ preventScroll: true });
}

function wire() {
  $('#signin-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    state.token = $('#token-input').value.trim();
    sessionStorage.setItem(TOKEN_KEY, state.token);
    $('#token-input').value = '';
    await boot();
  });
  $('#sign-out').addEventListener('click', () => { location.hash = '#/'; showSignIn('Signed out.'); });
  $('#ns-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const ns = $('#ns-input').value.trim();
    if (ns) location.hash = `#/ns/${encodeURIComponent(ns)}`;
  });
  $('#jobs-table thead').addEventListener('click', (event) => {
    const th = event.target.closest('th');
    if (!th) return;
    const key = th.dataset.key;
    state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : 1 };
    renderJobs();
  });
  $('#fields').addEventListener('input', onFieldInput);
  $('#fields').addEventListener('change', onFieldInput);
  $('#yaml-input').addEventListener('input', () => {
    clearTimeout(state.yamlTimer);
    state.yamlTimer = setTimeout(onYamlInput, 250);
  });
  $('#yaml-file').addEventListener('change', async (event) => {
    const file = event.target.files[0];
    if (!file) return;
    $('#yaml-input').value = await file.text();
    onYamlInput();
  });
  $('#form-errors').addEventListener('click', (event) => {
    const link = event.target.closest('a[data-focus]');
    if (link) { event.preventDefault(); document.getElementById(link.dataset.focus).focus(); }
  });
  $('#plan-button').addEventListener('click', () => { if (onYamlInput()) doPlan(state.ns); });
  $('#submit-button').addEventListener('click', () => doSubmit(state.ns));
  for (const verb of JOB_BUTTONS) $(`#${verb}-button`).addEventListener('click', () => act(verb));
  window.addEventListener('hashchange', route);
}

wire();
boot();
