/*
 * Guildhall dashboard: plain JavaScript, no framework, no build step.
 *
 * Sections: DOM helpers, formatting, API client (with the access token,
 * and the "hidden: sign in" marker of text withheld without it), toasts,
 * state, routing, workers view, logs panel, pipeline view, task view,
 * priorities and scheduled tasks, flows (a flow as a graph), errors view,
 * dead letters view, live updates (SSE), start-up.
 *
 * Security: every string that comes from the server goes into the page as
 * text (textContent, text nodes, setAttribute), never as markup. Nodes are
 * built with el() / svgEl(). The page's Content-Security-Policy forbids
 * inline scripts and styles, so layout is done with classes and SVG
 * attributes only.
 */
'use strict';

(() => {
  // =====================================================================
  // DOM helpers
  // =====================================================================

  const SVG_NS = 'http://www.w3.org/2000/svg';

  /** Appends children: nodes as they are, anything else as text. */
  function append(node, children) {
    for (const child of children) {
      if (child == null || child === false || child === true) continue;
      if (Array.isArray(child)) append(node, child);
      else if (child instanceof Node) node.appendChild(child);
      else node.appendChild(document.createTextNode(String(child)));
    }
    return node;
  }

  /**
   * Sets attributes: `class` may be an array (falsy entries skipped), a
   * function value under `on<event>` is a listener, `true` is an empty
   * attribute, null / undefined / false are skipped. Values are set with
   * setAttribute, so they are never parsed as markup.
   */
  function setAttrs(node, attrs) {
    if (!attrs) return node;
    for (const [key, value] of Object.entries(attrs)) {
      if (value == null || value === false) continue;
      if (typeof value === 'function' && key.startsWith('on')) {
        node.addEventListener(key.slice(2), value);
      } else if (key === 'class' && Array.isArray(value)) {
        const cls = value.filter(Boolean).join(' ');
        if (cls) node.setAttribute('class', cls);
      } else if (value === true) {
        node.setAttribute(key, '');
      } else {
        node.setAttribute(key, String(value));
      }
    }
    return node;
  }

  /** Builds an HTML element: el('a', {href: '#x'}, 'text', otherNode). */
  function el(tag, attrs, ...children) {
    return append(setAttrs(document.createElement(tag), attrs), children);
  }

  /** Builds an SVG element. */
  function svgEl(tag, attrs, ...children) {
    return append(setAttrs(document.createElementNS(SVG_NS, tag), attrs), children);
  }

  /** Replaces a node's children. */
  function fill(node, ...children) {
    node.replaceChildren();
    return append(node, children);
  }

  /** Sets a node's text if it changed. */
  function setText(node, text) {
    const s = String(text);
    if (node.textContent !== s) node.textContent = s;
  }

  const $ = (selector, root = document) => root.querySelector(selector);

  const collator = new Intl.Collator('en', { numeric: true, sensitivity: 'base' });
  const natural = (a, b) => collator.compare(String(a), String(b));

  // =====================================================================
  // Formatting
  // =====================================================================

  const STATUSES = ['processing', 'idle', 'paused', 'draining', 'starting', 'suspect', 'dead', 'stopped'];
  const OUTCOMES = ['queued', 'running', 'retrying', 'succeeded', 'failed', 'retried',
    'dead_lettered', 'lost', 'requeued', 'abandoned', 'scheduled', 'cancelled', 'held', 'waiting'];
  const statusClass = (s) => 'st-' + (STATUSES.includes(s) ? s : 'unknown');
  const outcomeClass = (s) => 'oc-' + (OUTCOMES.includes(s) ? s : 'unknown');

  const isNum = (v) => typeof v === 'number' && Number.isFinite(v);
  const DASH = '\u2013';

  /** A duration: "840 ms", "2.41 s", "3m 05s", "2h 10m". */
  function fmtMs(ms) {
    if (!isNum(ms)) return DASH;
    ms = Math.max(0, ms);
    if (ms < 1000) return `${Math.round(ms)} ms`;
    const s = ms / 1000;
    if (s < 10) return `${s.toFixed(2)} s`;
    if (s < 60) return `${s.toFixed(1)} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m ${String(Math.floor(s % 60)).padStart(2, '0')}s`;
    const h = Math.floor(m / 60);
    if (h < 48) return `${h}h ${String(m % 60).padStart(2, '0')}m`;
    return `${Math.floor(h / 24)}d ${h % 24}h`;
  }

  /** How long ago: "just now", "12 s ago", "4 min ago", "3 h ago". */
  function fmtAgo(ms) {
    if (!isNum(ms)) return DASH;
    ms = Math.max(0, ms);
    if (ms < 2000) return 'just now';
    const s = Math.round(ms / 1000);
    if (s < 60) return `${s} s ago`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min ago`;
    const h = Math.floor(m / 60);
    if (h < 48) return `${h} h ago`;
    return `${Math.floor(h / 24)} d ago`;
  }

  function fmtBytes(b) {
    if (!isNum(b)) return DASH;
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
    const n = i === 0 ? String(b) : b < 10 ? b.toFixed(1) : String(Math.round(b));
    return `${n} ${units[i]}`;
  }

  function fmtPct(ratio, digits = 1) {
    if (!isNum(ratio)) return DASH;
    return `${(ratio * 100).toFixed(digits).replace(/\.0+$/, '')}%`;
  }

  function fmtRate(r) {
    if (!isNum(r)) return DASH;
    return `${r >= 100 ? r.toFixed(0) : r >= 10 ? r.toFixed(1) : r.toFixed(2)}/s`;
  }

  function fmtInt(n) {
    return isNum(n) ? Math.round(n).toLocaleString('en-US') : DASH;
  }

  function fmtNum(n, digits = 2) {
    return isNum(n) ? n.toFixed(digits) : DASH;
  }

  function fmtClock(atMs) {
    if (!isNum(atMs)) return DASH;
    return new Date(atMs).toLocaleString();
  }

  function truncate(s, n) {
    s = String(s);
    return s.length > n ? `${s.slice(0, n - 1)}\u2026` : s;
  }

  // Server time: the clock of the coordinator, which may differ from ours.
  let clockOffset = 0;
  const serverNow = () => Date.now() + clockOffset;

  /** "12 s ago", kept current by the ticker (class `ago`). */
  function agoNode(atMs) {
    if (!isNum(atMs)) return el('span', { class: 'none' }, 'never');
    return el('time', { class: 'ago', 'data-at': atMs, title: fmtClock(atMs) },
      fmtAgo(serverNow() - atMs));
  }

  /** Time elapsed since `atMs`, kept current by the ticker (class `since`). */
  function sinceNode(atMs) {
    return el('span', { class: 'since', 'data-at': atMs }, fmtMs(serverNow() - atMs));
  }

  /** Refreshes the relative times under `root`. */
  function tickTimes(root) {
    const now = serverNow();
    for (const n of root.querySelectorAll('.ago')) setText(n, fmtAgo(now - Number(n.dataset.at)));
    for (const n of root.querySelectorAll('.since')) setText(n, fmtMs(now - Number(n.dataset.at)));
  }

  /** A link to the Task view. */
  function taskLink(id, text) {
    return el('a', { class: 'task-link', href: `#task/${encodeURIComponent(id)}`, 'data-task-id': id },
      text == null ? id : text);
  }

  // =====================================================================
  // API client
  // =====================================================================

  const TOKEN_KEY = 'guildhall-token';

  function readStoredToken() {
    try { return sessionStorage.getItem(TOKEN_KEY) || null; } catch (_) { return null; }
  }

  let token = readStoredToken();
  /** The user cancelled the token dialog: background calls stop asking. */
  let tokenDeclined = false;

  function setToken(value) {
    token = value || null;
    try {
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch (_) { /* storage unavailable: keep it in memory */ }
    if (token) tokenDeclined = false;
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  /**
   * Calls the API. `body` (if given) is sent as JSON. Answers the parsed
   * JSON; throws an ApiError with the server's `error` message otherwise.
   * On 401 it asks for the token (once for all calls waiting) and retries.
   * Options: `allow404` answers null for a 404; `interactive` asks for the
   * token even after the user cancelled the dialog (a click, not a poll).
   */
  async function api(path, { method = 'GET', body, allow404 = false, interactive = false } = {}) {
    for (let round = 0; ; round++) {
      const used = token;
      const headers = { Accept: 'application/json' };
      if (body !== undefined) headers['Content-Type'] = 'application/json';
      if (used) headers.Authorization = `Bearer ${used}`;
      let res;
      try {
        res = await fetch(path, {
          method,
          headers,
          body: body === undefined ? undefined : JSON.stringify(body),
          cache: 'no-store',
          credentials: 'same-origin',
        });
      } catch (e) {
        throw new ApiError(0, `cannot reach the coordinator (${e.message || e})`);
      }
      if (res.status === 401 && round < 3) {
        if (token !== used) continue; // another call set a new token meanwhile
        const message = used
          ? 'The stored access token was refused. Enter the coordinator\'s --api-token:'
          : 'This coordinator needs an access token for this. Enter its --api-token:';
        if (used) setToken(null);
        if (tokenDeclined && !interactive) {
          throw new ApiError(401, 'an access token is needed (click "Token" in the header)');
        }
        const entered = await askToken(message);
        if (!entered) {
          tokenDeclined = true;
          throw new ApiError(401, 'an access token is needed (click "Token" in the header)');
        }
        continue;
      }
      let data = null;
      const text = await res.text();
      if (text) {
        try { data = JSON.parse(text); } catch (_) { data = null; }
      }
      if (res.status === 404 && allow404) return null;
      if (!res.ok) {
        const message = data && typeof data.error === 'string'
          ? data.error
          : `${res.status} ${res.statusText || 'error'} from ${method} ${path}`;
        throw new ApiError(res.status, message);
      }
      return data;
    }
  }

  const enc = encodeURIComponent;

  // ---- the token dialog ----

  let tokenPrompt = null;
  let tokenResolve = null;

  /** Shows the token dialog; resolves with the token, or null if cancelled. */
  function askToken(message) {
    if (tokenPrompt) return tokenPrompt;
    const dialog = $('#token-dialog');
    setText($('#token-message'), message);
    $('#token-input').value = '';
    tokenPrompt = new Promise((resolve) => { tokenResolve = resolve; });
    if (typeof dialog.showModal === 'function') {
      if (!dialog.open) dialog.showModal();
    } else {
      dialog.setAttribute('open', '');
    }
    $('#token-input').focus();
    return tokenPrompt;
  }

  function finishToken(value) {
    const resolve = tokenResolve;
    tokenResolve = null;
    tokenPrompt = null;
    const dialog = $('#token-dialog');
    if (dialog.open) {
      if (typeof dialog.close === 'function') dialog.close();
      else dialog.removeAttribute('open');
    }
    if (value) {
      setToken(value);
      if (source) connectEvents(); // EventSource carries the token in its URL
      reloadWithheld();
    }
    if (resolve) resolve(value || null);
  }

  function setupTokenDialog() {
    const dialog = $('#token-dialog');
    $('#token-form').addEventListener('submit', (e) => {
      e.preventDefault();
      const value = $('#token-input').value.trim();
      if (value) finishToken(value);
    });
    $('#token-cancel').addEventListener('click', () => finishToken(null));
    $('#token-clear').addEventListener('click', () => {
      setToken(null);
      finishToken(null);
      toast('The stored token is forgotten.');
      if (source) connectEvents();
    });
    dialog.addEventListener('cancel', (e) => { e.preventDefault(); finishToken(null); });
    dialog.addEventListener('close', () => { if (tokenResolve) finishToken(null); });
    $('#token-button').addEventListener('click', async () => {
      const entered = await askToken(token
        ? 'A token is stored for this tab. Enter another one, or forget it:'
        : 'Enter the coordinator\'s --api-token:');
      if (entered) loadAll();
    });
  }

  // ---- text withheld without the token ----

  /**
   * What stands for worker-written text the coordinator withheld (it has a
   * token and this page has not given it): a button that asks for it.
   */
  function hiddenText() {
    return el('button', {
      type: 'button',
      class: 'redacted',
      'data-redacted': 'true',
      title: 'Worker-written text (error messages, payload previews) is shown only with the coordinator\'s access token. Click to enter it.',
    }, 'hidden: sign in');
  }

  /** `text`, or the withheld marker when the server said `redacted`. */
  function workerText(text, redacted, empty = '') {
    if (redacted && text == null) return hiddenText();
    return text == null || text === '' ? empty : text;
  }

  /** Fetches again the views that may hold text withheld without the token. */
  function reloadWithheld() {
    if (state.task.id) loadTask(state.task.id, { quiet: true });
    if (state.dead.stage) loadDead();
  }

  /** Asks for the token (a "hidden: sign in" was clicked), then reloads. */
  async function signIn() {
    const entered = await askToken('Error messages and payload previews are shown only with the access token. Enter the coordinator\'s --api-token:');
    if (entered) loadAll();
  }

  function setupHiddenText() {
    document.addEventListener('click', (e) => {
      if (e.target.closest('button.redacted')) signIn();
    });
  }

  // =====================================================================
  // Toasts
  // =====================================================================

  let lastToast = { text: '', at: 0 };

  /** A short message in the corner; `kind` is info, ok or error. */
  function toast(message, kind = 'info', extraLines = []) {
    const text = String(message);
    const now = Date.now();
    if (text === lastToast.text && now - lastToast.at < 1500 && !extraLines.length) return;
    lastToast = { text, at: now };
    const box = $('#toasts');
    const node = el('div', { class: ['toast', `toast-${kind}`], role: kind === 'error' ? 'alert' : 'status' },
      el('span', { class: 'toast-line' }, text),
      extraLines.map((line) => el('span', { class: 'toast-line' }, line)));
    node.addEventListener('click', () => node.remove());
    box.appendChild(node);
    while (box.children.length > 6) box.firstChild.remove();
    setTimeout(() => node.remove(), kind === 'error' ? 10000 : 5000);
  }

  function toastError(e, prefix) {
    const message = e instanceof Error ? e.message : String(e);
    toast(prefix ? `${prefix}: ${message}` : message, 'error');
  }

  // =====================================================================
  // State
  // =====================================================================

  const state = {
    /** id -> WorkerView */
    workers: new Map(),
    /** GET /api/stages body */
    stages: null,
    /** GET /api/scaling body */
    scaling: null,
    /** GET /api/errors body; errorsMissing when the endpoint answers 404 */
    errors: null,
    errorsMissing: false,
    view: 'workers',
    filter: { text: '', status: '' },
    /** stages whose worker group is collapsed */
    collapsed: new Set(),
    task: { id: null, data: null, error: null, timer: null, seq: 0 },
    dead: { stage: '', listing: null, loading: false, selected: new Set(), error: null },
    logs: { worker: null, seq: 0 },
    /** views whose rendering waits until they are shown */
    dirty: new Set(),
  };

  /** Stage names in pipeline order (see pipelineLayout), cached per body. */
  let orderCache = { stages: undefined, order: [] };
  function stageOrder() {
    if (orderCache.stages !== state.stages) {
      const stages = state.stages && Array.isArray(state.stages.stages) ? state.stages.stages : [];
      orderCache = { stages: state.stages, order: pipelineLayout(stages).order };
    }
    return orderCache.order;
  }

  function scalingFor(stage) {
    const list = state.scaling && Array.isArray(state.scaling.stages) ? state.scaling.stages : [];
    return list.find((s) => s.stage === stage) || null;
  }

  // =====================================================================
  // Routing (#workers, #pipeline, #task/ID, #errors, #dead/STAGE)
  // =====================================================================

  const VIEWS = ['workers', 'pipeline', 'task', 'errors', 'dead'];

  function parseHash() {
    const raw = location.hash.replace(/^#\/?/, '');
    const slash = raw.indexOf('/');
    const view = slash < 0 ? raw : raw.slice(0, slash);
    let arg = slash < 0 ? '' : raw.slice(slash + 1);
    try { arg = decodeURIComponent(arg); } catch (_) { /* keep it raw */ }
    return { view: VIEWS.includes(view) ? view : 'workers', arg };
  }

  function route() {
    const { view, arg } = parseHash();
    showView(view);
    if (view === 'task') {
      loadTaskList();
      if (arg) {
        $('#task-search').value = arg;
        if (arg !== state.task.id) loadTask(arg);
        else scheduleTaskRefresh();
      } else if (!state.task.id) {
        $('#task-search').focus();
      }
    } else {
      stopTaskRefresh();
    }
    syncFlow();
    if (view === 'dead') {
      fillDeadStages();
      if (arg && arg !== state.dead.stage) {
        state.dead.stage = arg;
        $('#dead-stage').value = arg;
        loadDead();
      } else if (!state.dead.listing && state.dead.stage && !state.dead.loading) {
        loadDead();
      }
    }
  }

  function showView(view) {
    state.view = view;
    for (const section of document.querySelectorAll('.view')) {
      section.hidden = section.dataset.panel !== view;
    }
    for (const link of document.querySelectorAll('a[data-view]')) {
      const active = link.dataset.view === view;
      link.classList.toggle('active', active);
      if (active) link.setAttribute('aria-current', 'page');
      else link.removeAttribute('aria-current');
    }
    if (state.dirty.has(view)) renderView(view);
    tickTimes($(`#view-${view}`));
  }

  /** Renders a view now if shown, else when it is shown. */
  function invalidate(view) {
    if (state.view === view) renderView(view);
    else state.dirty.add(view);
  }

  function renderView(view) {
    state.dirty.delete(view);
    if (view === 'pipeline') renderPipeline();
    else if (view === 'errors') renderErrors();
    else if (view === 'dead') renderDead();
    else if (view === 'task') renderTask();
  }

  // =====================================================================
  // Workers view
  //
  // One card per worker, keyed by id, grouped by stage. An update touches
  // only the cards whose worker changed (compared by a signature without
  // the fields that age by themselves); relative times are refreshed by the
  // ticker in place.
  // =====================================================================

  /** id -> {id, stage, root, refs, sig} */
  const cards = new Map();
  /** stage -> {stage, root, body, toggle, count, chips, ids: Set} */
  const groups = new Map();

  const signature = (w) =>
    JSON.stringify(w, (k, v) => (k.endsWith('_ago_ms') || k === 'running_ms' ? undefined : v));

  function actionButton(action, label, title) {
    return el('button', { type: 'button', class: ['btn', 'btn-small', action === 'restart' && 'btn-danger', action === 'drain' && 'btn-warn'], 'data-action': action, title }, label);
  }

  function metric(label, dd, title) {
    return el('div', { class: 'metric', title }, el('dt', null, label), dd);
  }

  function buildCard(w) {
    const refs = {};
    const ref = (name, node) => { refs[name] = node; return node; };
    const root = el('article', { class: 'worker-card', 'data-worker-id': w.id, 'data-status': w.status, 'data-stage': w.stage },
      el('header', { class: 'card-head' },
        ref('id', el('span', { class: 'worker-id', title: w.id }, w.id)),
        ref('status', el('span', { class: 'status badge' }))),
      ref('sub', el('div', { class: 'card-sub' })),
      el('dl', { class: 'metrics' },
        metric('Queue', ref('queue', el('dd', { class: 'm-queue' }))),
        metric('Avg time', ref('avg', el('dd', { class: 'm-avg' }))),
        metric('Success', ref('success', el('dd', { class: 'm-success' }))),
        metric('CPU', ref('cpu', el('dd', { class: 'm-cpu' }))),
        metric('Memory', ref('mem', el('dd', { class: 'm-mem' }))),
        metric('Last done', ref('last', el('dd', { class: 'm-last' }))),
        metric('Throughput', ref('rate', el('dd', { class: 'm-rate' }))),
        metric('Done / failed', ref('done', el('dd', { class: 'm-done' }))),
        metric('Concurrency', ref('conc', el('dd', { class: 'm-conc' })))),
      ref('tasks', el('div', { class: 'current-tasks' })),
      ref('note', el('div', { class: 'card-note', hidden: true })),
      el('div', { class: 'controls' },
        actionButton('pause', 'Pause', 'Stop taking tasks; finish those in hand'),
        actionButton('resume', 'Resume', 'Take tasks again'),
        actionButton('drain', 'Drain', 'Finish the tasks in hand, then exit'),
        actionButton('restart', 'Restart', 'Restart the supervised worker process'),
        actionButton('logs', 'Logs', 'The worker process\'s last output lines'),
        el('form', { class: 'conc-form', 'data-worker-id': w.id },
          ref('concInput', el('input', { type: 'number', min: 1, max: 1024, step: 1, class: 'conc-input', name: 'concurrency', 'aria-label': 'Concurrency', value: w.concurrency })),
          el('button', { type: 'submit', class: 'btn btn-small', 'data-action': 'concurrency', title: 'Set how many tasks it runs at once' }, 'Set'))));
    return { id: w.id, stage: w.stage, root, refs, sig: '' };
  }

  function updateCard(card, w) {
    const { refs, root } = card;
    root.dataset.status = w.status;
    root.dataset.stage = w.stage;
    setText(refs.status, w.status);
    refs.status.className = `status badge ${statusClass(w.status)}`;

    const sub = [w.stage];
    const others = (w.stages || []).filter((s) => s !== w.stage);
    if (others.length) sub.push(`also ${others.join(', ')}`);
    if (w.hostname) sub.push(w.hostname);
    if (w.mode) sub.push(w.mode);
    if (w.version) sub.push(`v${w.version}`);
    setText(refs.sub, sub.join(' \u00b7 '));
    refs.sub.title = [
      `next: ${w.next || DASH}`,
      `pid: ${w.worker_pid == null ? DASH : w.worker_pid}`,
      `agent CPU ${fmtPct(w.agent_cpu_ratio, 0)}, memory ${fmtBytes(w.agent_memory_bytes)}`,
      `prefetch asked: ${w.prefetch_asked == null ? DASH : w.prefetch_asked}`,
      `broker round trip: ${fmtMs(w.rtt_ms)}`,
      `heartbeat every ${fmtMs(w.heartbeat_ms)}`,
    ].join('\n');

    setText(refs.queue, w.queue_size == null ? DASH : fmtInt(w.queue_size));
    refs.queue.title = `ready ${w.queue_size == null ? '?' : w.queue_size}, unacked ${w.queue_unacked == null ? '?' : w.queue_unacked}`;
    setText(refs.avg, fmtMs(w.avg_processing_ms));
    refs.avg.title = `p95 ${fmtMs(w.p95_processing_ms)}`;
    setText(refs.success, fmtPct(w.success_rate));
    setText(refs.cpu, fmtPct(w.cpu_ratio, 0));
    setText(refs.mem, fmtBytes(w.memory_bytes));
    const lastAt = isNum(w.last_completed_at_ms) ? String(w.last_completed_at_ms) : '';
    if (refs.last.dataset.at !== lastAt || !refs.last.firstChild) {
      refs.last.dataset.at = lastAt;
      fill(refs.last, agoNode(w.last_completed_at_ms));
    }
    setText(refs.rate, fmtRate(w.throughput_per_s));
    setText(refs.done, `${fmtInt(w.done)} / ${fmtInt(w.failed)}`);
    setText(refs.conc, String(w.concurrency));
    const input = refs.concInput;
    if (document.activeElement !== input && !input.dataset.edited) input.value = String(w.concurrency);

    const tasks = Array.isArray(w.current_tasks) ? w.current_tasks : [];
    if (tasks.length) {
      fill(refs.tasks, el('span', { class: 'label' }, 'Tasks'),
        tasks.map((t) => el('span', { class: 'task-chip', title: `attempt ${t.attempt}, started ${fmtClock(t.started_at_ms)}` },
          taskLink(t.task_id), isNum(t.started_at_ms) ? sinceNode(t.started_at_ms) : null)));
    } else {
      fill(refs.tasks, el('span', { class: 'label' }, 'Tasks'), el('span', { class: 'none' }, 'none'));
    }

    const notes = [];
    if (w.stopped_reason) notes.push(`stopped: ${w.stopped_reason}`);
    if (w.status === 'dead' && isNum(w.dead_since_ms)) notes.push(el('span', null, 'dead since ', agoNode(w.dead_since_ms)));
    if (w.status === 'suspect' && isNum(w.suspect_since_ms)) notes.push(el('span', null, 'silent since ', agoNode(w.suspect_since_ms)));
    if (w.restarts) notes.push(`${w.restarts} restart${w.restarts === 1 ? '' : 's'}`);
    if (notes.length) {
      fill(refs.note, notes.map((n, i) => [i ? ' \u00b7 ' : null, n]));
      refs.note.hidden = false;
    } else if (!refs.note.hidden) {
      refs.note.hidden = true;
      refs.note.replaceChildren();
    }
  }

  function matchesFilter(w) {
    const { text, status } = state.filter;
    if (status && w.status !== status) return false;
    if (!text) return true;
    const hay = `${w.id} ${w.stage} ${(w.stages || []).join(' ')} ${w.status} ${w.hostname || ''}`.toLowerCase();
    return text.split(/\s+/).every((term) => hay.includes(term));
  }

  function groupRank(stage) {
    const order = stageOrder();
    const i = order.indexOf(stage);
    return i < 0 ? order.length : i;
  }

  function compareStages(a, b) {
    return groupRank(a) - groupRank(b) || natural(a, b);
  }

  function ensureGroup(stage) {
    let group = groups.get(stage);
    if (group) return group;
    const collapsed = state.collapsed.has(stage);
    const toggle = el('button', { type: 'button', class: 'group-toggle', 'aria-expanded': String(!collapsed), 'data-stage': stage },
      el('span', { class: 'group-name' }, stage));
    const count = el('span', { class: 'group-count' });
    toggle.appendChild(count);
    const chips = el('div', { class: 'chips' });
    const body = el('div', { class: 'cards', hidden: collapsed });
    const root = el('section', { class: 'stage-group', 'data-stage': stage },
      el('header', { class: 'group-head' },
        toggle, chips,
        el('div', { class: 'group-actions' }, stageActionButtons(stage))),
      body);
    group = { stage, root, body, toggle, count, chips, ids: new Set() };
    groups.set(stage, group);
    // Insert in pipeline order.
    const container = $('#worker-groups');
    const after = [...groups.values()]
      .filter((g) => g !== group && g.root.isConnected && compareStages(g.stage, stage) > 0)
      .sort((a, b) => compareStages(a.stage, b.stage))[0];
    container.insertBefore(root, after ? after.root : null);
    return group;
  }

  function stageActionButtons(stage) {
    return [
      el('button', { type: 'button', class: 'btn btn-small', 'data-stage-action': 'pause', 'data-stage': stage, title: `Pause every live worker of ${stage}` }, 'Pause all'),
      el('button', { type: 'button', class: 'btn btn-small', 'data-stage-action': 'resume', 'data-stage': stage, title: `Resume every live worker of ${stage}` }, 'Resume all'),
      el('button', { type: 'button', class: 'btn btn-small btn-warn', 'data-stage-action': 'drain', 'data-stage': stage, title: `Drain every live worker of ${stage}` }, 'Drain all'),
      el('button', { type: 'button', class: 'btn btn-small', 'data-stage-action': 'rate-limit', 'data-stage': stage, title: `Set or lift ${stage}'s rate limit (tasks started per second, whole stage)` }, 'Rate limit'),
      el('button', { type: 'button', class: 'btn btn-small', 'data-stage-action': 'scale', 'data-delta': '-1', 'data-stage': stage, title: `Ask the actuator (--scale-command or --scale-webhook) for one worker fewer on ${stage}` }, 'Scale \u22121'),
      el('button', { type: 'button', class: 'btn btn-small', 'data-stage-action': 'scale', 'data-delta': '1', 'data-stage': stage, title: `Ask the actuator (--scale-command or --scale-webhook) for one worker more on ${stage}` }, 'Scale +1'),
    ];
  }

  /** Re-sorts groups in pipeline order (after /api/stages changed). */
  function reorderGroups() {
    const container = $('#worker-groups');
    const sorted = [...groups.values()].sort((a, b) => compareStages(a.stage, b.stage));
    const current = [...container.children];
    if (sorted.length === current.length && sorted.every((g, i) => current[i] === g.root)) return;
    append(container, sorted.map((g) => g.root));
  }

  /** Counts, order, visibility of one group; removes it when empty. */
  function refreshGroup(stage) {
    const group = groups.get(stage);
    if (!group) return;
    if (!group.ids.size) {
      group.root.remove();
      groups.delete(stage);
      return;
    }
    const ids = [...group.ids].sort(natural);
    const kids = group.body.children;
    const inOrder = kids.length === ids.length && ids.every((id, i) => kids[i].dataset.workerId === id);
    if (!inOrder) append(group.body, ids.map((id) => cards.get(id).root));

    const byStatus = new Map();
    let shown = 0;
    for (const id of ids) {
      const w = state.workers.get(id);
      if (!w) continue;
      byStatus.set(w.status, (byStatus.get(w.status) || 0) + 1);
      if (!cards.get(id).root.hidden) shown++;
    }
    const filtered = state.filter.text || state.filter.status;
    setText(group.count, filtered
      ? `${shown} of ${ids.length} worker${ids.length === 1 ? '' : 's'}`
      : `${ids.length} worker${ids.length === 1 ? '' : 's'}`);
    const statuses = [...byStatus.keys()].sort((a, b) => {
      const ia = STATUSES.indexOf(a), ib = STATUSES.indexOf(b);
      return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib);
    });
    const chipsKey = statuses.map((s) => `${s}:${byStatus.get(s)}`).join(',');
    if (group.chips.dataset.key !== chipsKey) {
      group.chips.dataset.key = chipsKey;
      fill(group.chips, statuses.map((s) =>
        el('span', { class: ['chip', statusClass(s)], 'data-status': s }, `${byStatus.get(s)} ${s}`)));
    }
    group.root.hidden = Boolean(filtered) && shown === 0;
  }

  /**
   * Applies a set of worker updates: `upserts` (WorkerViews), `removed`
   * ids; `full` replaces the whole set.
   */
  function applyWorkers(upserts, removed, full) {
    const touched = new Set();
    const gone = new Set(removed || []);
    if (full) {
      const keep = new Set(upserts.map((w) => w.id));
      for (const id of state.workers.keys()) if (!keep.has(id)) gone.add(id);
    }
    for (const id of gone) {
      state.workers.delete(id);
      const card = cards.get(id);
      if (!card) continue;
      card.root.remove();
      cards.delete(id);
      const group = groups.get(card.stage);
      if (group) group.ids.delete(id);
      touched.add(card.stage);
    }
    for (const w of upserts) {
      if (!w || typeof w.id !== 'string') continue;
      state.workers.set(w.id, w);
      const sig = signature(w);
      let card = cards.get(w.id);
      if (!card) {
        card = buildCard(w);
        cards.set(w.id, card);
        const group = ensureGroup(w.stage);
        group.ids.add(w.id);
        group.body.appendChild(card.root);
      } else if (card.sig === sig) {
        continue;
      } else if (card.stage !== w.stage) {
        const old = groups.get(card.stage);
        if (old) old.ids.delete(w.id);
        touched.add(card.stage);
        card.stage = w.stage;
        const group = ensureGroup(w.stage);
        group.ids.add(w.id);
        group.body.appendChild(card.root);
      }
      updateCard(card, w);
      card.sig = sig;
      card.root.hidden = !matchesFilter(w);
      touched.add(w.stage);
    }
    for (const stage of touched) refreshGroup(stage);
    refreshWorkerSummary();
  }

  function refreshWorkerSummary() {
    const total = state.workers.size;
    $('#workers-empty').hidden = total > 0;
    const byStatus = new Map();
    let shown = 0;
    for (const [id, w] of state.workers) {
      byStatus.set(w.status, (byStatus.get(w.status) || 0) + 1);
      const card = cards.get(id);
      if (card && !card.root.hidden) shown++;
    }
    const parts = [`${total} worker${total === 1 ? '' : 's'}`];
    for (const s of STATUSES) if (byStatus.get(s)) parts.push(`${byStatus.get(s)} ${s}`);
    if (state.filter.text || state.filter.status) parts.push(`${shown} shown`);
    setText($('#worker-summary'), parts.join(' \u00b7 '));
  }

  function applyFilter() {
    state.filter.text = $('#worker-filter').value.trim().toLowerCase();
    state.filter.status = $('#status-filter').value;
    for (const [id, card] of cards) {
      const w = state.workers.get(id);
      card.root.hidden = !w || !matchesFilter(w);
    }
    for (const stage of groups.keys()) refreshGroup(stage);
    refreshWorkerSummary();
  }

  function setCollapsed(stage, collapsed) {
    const group = groups.get(stage);
    if (collapsed) state.collapsed.add(stage);
    else state.collapsed.delete(stage);
    if (!group) return;
    group.body.hidden = collapsed;
    group.toggle.setAttribute('aria-expanded', String(!collapsed));
    if (!collapsed) tickTimes(group.body);
  }

  /** Runs `fn` with `button` disabled meanwhile. */
  async function busy(button, fn) {
    if (button) { button.disabled = true; button.classList.add('busy'); }
    try {
      return await fn();
    } finally {
      if (button) { button.disabled = false; button.classList.remove('busy'); }
    }
  }

  async function workerCommand(id, action, button) {
    await busy(button, async () => {
      try {
        const answer = await api(`/api/workers/${enc(id)}/${action}`, { method: 'POST', interactive: true });
        toast(`${id}: ${action} \u2013 ${(answer && answer.message) || 'ok'}`, 'ok');
      } catch (e) {
        toastError(e, `${id}: ${action}`);
      }
    });
  }

  async function setConcurrency(id, input, button) {
    const n = Number(input.value);
    if (!Number.isInteger(n) || n < 1 || n > 1024) {
      toast(`${id}: concurrency must be a whole number from 1 to 1024`, 'error');
      return;
    }
    await busy(button, async () => {
      try {
        const answer = await api(`/api/workers/${enc(id)}/concurrency`, { method: 'POST', body: { concurrency: n }, interactive: true });
        delete input.dataset.edited;
        toast(`${id}: concurrency ${n} \u2013 ${(answer && answer.message) || 'ok'}`, 'ok');
      } catch (e) {
        toastError(e, `${id}: concurrency`);
      }
    });
  }

  /** The stage's rate_limit from /api/stages (null without one). */
  function rateLimitOf(stage) {
    const list = state.stages && Array.isArray(state.stages.stages) ? state.stages.stages : [];
    const s = list.find((x) => x.name === stage);
    return (s && s.rate_limit) || null;
  }

  /** Asks for a stage's new rate limit and PUTs it (empty or "off" lifts it). */
  async function setRateLimit(stage, button) {
    const current = rateLimitOf(stage);
    const entered = window.prompt(`Rate limit for ${stage}: tasks started per second across its workers (50/s, 30/min, 1/h); empty or "off" lifts it.`, current ? current.limit : '');
    if (entered === null) return;
    const text = entered.trim();
    const limit = text === '' || text === 'off' ? null : text;
    await busy(button, async () => {
      try {
        await api(`/api/stages/${enc(stage)}/rate-limit`, { method: 'PUT', body: { limit }, interactive: true });
        toast(limit ? `${stage}: at most ${limit}` : `${stage}: rate limit lifted`, 'ok');
      } catch (e) {
        toastError(e, `${stage}: rate limit`);
      }
    });
  }

  /** Asks the actuator for `delta` workers more (or fewer) on a stage. */
  async function scaleStage(stage, delta, button) {
    await busy(button, async () => {
      try {
        const answer = await api(`/api/stages/${enc(stage)}/scale`, { method: 'POST', body: { delta }, interactive: true });
        const how = answer.dry_run ? 'dry run: logged only' : `through the ${answer.actuator}`;
        toast(`${stage}: ${answer.from} \u2192 ${answer.to} worker${answer.to === 1 ? '' : 's'} asked (${how})`, 'ok');
      } catch (e) {
        toastError(e, `${stage}: scale`);
      }
    });
  }

  async function stageCommand(stage, action, button) {
    await busy(button, async () => {
      try {
        const answer = await api(`/api/stages/${enc(stage)}/${action}`, { method: 'POST', interactive: true });
        const results = (answer && Array.isArray(answer.results)) ? answer.results : [];
        const failed = results.filter((r) => !r.ok);
        const lines = failed.slice(0, 5).map((r) => `${r.worker}: ${r.message}`);
        if (failed.length > 5) lines.push(`\u2026 and ${failed.length - 5} more`);
        toast(`${stage}: ${action} \u2013 ${results.length - failed.length} of ${results.length} worker${results.length === 1 ? '' : 's'} ok`,
          failed.length ? 'error' : 'ok', lines);
      } catch (e) {
        toastError(e, `${stage}: ${action} all`);
      }
    });
  }

  function setupWorkersView() {
    const container = $('#worker-groups');
    container.addEventListener('click', (e) => {
      const toggle = e.target.closest('.group-toggle');
      if (toggle) {
        const stage = toggle.dataset.stage;
        setCollapsed(stage, !state.collapsed.has(stage));
        return;
      }
      const button = e.target.closest('button[data-action]');
      if (!button) return;
      const card = button.closest('.worker-card');
      if (!card) return;
      const id = card.dataset.workerId;
      const action = button.dataset.action;
      if (action === 'concurrency') return; // the form's submit handles it
      if (action === 'logs') openLogs(id);
      else workerCommand(id, action, button);
    });
    container.addEventListener('submit', (e) => {
      const form = e.target.closest('.conc-form');
      if (!form) return;
      e.preventDefault();
      const card = form.closest('.worker-card');
      setConcurrency(card.dataset.workerId, $('.conc-input', form), $('button[data-action="concurrency"]', form));
    });
    container.addEventListener('input', (e) => {
      if (e.target.classList.contains('conc-input')) e.target.dataset.edited = '1';
    });
    // Stage actions live in the group headers and in the pipeline table.
    document.addEventListener('click', (e) => {
      const button = e.target.closest('button[data-stage-action]');
      if (button && button.dataset.stageAction === 'rate-limit') setRateLimit(button.dataset.stage, button);
      else if (button && button.dataset.stageAction === 'scale') scaleStage(button.dataset.stage, Number(button.dataset.delta), button);
      else if (button) stageCommand(button.dataset.stage, button.dataset.stageAction, button);
    });
    let filterTimer = null;
    $('#worker-filter').addEventListener('input', () => {
      clearTimeout(filterTimer);
      filterTimer = setTimeout(applyFilter, 120);
    });
    $('#status-filter').addEventListener('change', applyFilter);
    $('#expand-all').addEventListener('click', () => { for (const s of groups.keys()) setCollapsed(s, false); });
    $('#collapse-all').addEventListener('click', () => { for (const s of groups.keys()) setCollapsed(s, true); });
  }

  // =====================================================================
  // Logs panel
  // =====================================================================

  async function openLogs(id) {
    const seq = ++state.logs.seq;
    state.logs.worker = id;
    const panel = $('#logs-panel');
    panel.hidden = false;
    panel.dataset.workerId = id;
    setText($('#logs-title'), `Logs \u2013 ${id}`);
    const box = $('#logs-lines');
    fill(box, el('div', { class: 'loading' }, 'Loading\u2026'));
    try {
      const answer = await api(`/api/workers/${enc(id)}/logs?lines=200`, { interactive: true });
      if (seq !== state.logs.seq) return;
      const lines = answer && Array.isArray(answer.lines) ? answer.lines : [];
      if (!lines.length) fill(box, el('div', { class: 'none' }, 'No output lines.'));
      else fill(box, lines.map((line) => el('div', { class: 'log-line' }, line)));
      box.scrollTop = box.scrollHeight;
    } catch (e) {
      if (seq !== state.logs.seq) return;
      fill(box, el('div', { class: 'none' }, `Could not fetch the logs: ${e.message}`));
      toastError(e, `${id}: logs`);
    }
  }

  function closeLogs() {
    state.logs.seq++;
    state.logs.worker = null;
    $('#logs-panel').hidden = true;
  }

  function setupLogs() {
    $('#logs-close').addEventListener('click', closeLogs);
    $('#logs-refresh').addEventListener('click', () => { if (state.logs.worker) openLogs(state.logs.worker); });
    document.addEventListener('keydown', (e) => {
      if (e.key === 'Escape' && !$('#logs-panel').hidden && !$('#token-dialog').open) closeLogs();
    });
  }

  // =====================================================================
  // Pipeline view
  // =====================================================================

  /**
   * Lays stages out left to right: a linked stage's column is its distance
   * from the start of its chain (following `next`), rows stack stages that
   * share a column; stages linked to nothing come after. Answers
   * {order: [names], pos: Map name -> {col, row}, cols, rows}.
   */
  function pipelineLayout(stages) {
    const byName = new Map(stages.map((s) => [s.name, s]));
    const names = [...byName.keys()].sort(natural);
    const nextOf = (n) => {
      const s = byName.get(n);
      return s && s.next && s.next !== n && byName.has(s.next) ? s.next : null;
    };
    const incoming = new Map(names.map((n) => [n, 0]));
    for (const n of names) {
      const next = nextOf(n);
      if (next) incoming.set(next, incoming.get(next) + 1);
    }
    const linked = names.filter((n) => nextOf(n) || incoming.get(n) > 0);
    const col = new Map();
    const walk = (start) => {
      const seen = new Set();
      let n = start;
      let c = 0;
      while (n && !seen.has(n)) {
        seen.add(n);
        if (col.has(n) && col.get(n) >= c) break;
        col.set(n, c);
        n = nextOf(n);
        c++;
      }
    };
    for (const n of linked) if (incoming.get(n) === 0) walk(n);
    for (const n of linked) if (!col.has(n)) walk(n); // cycles
    let maxCol = -1;
    for (const c of col.values()) maxCol = Math.max(maxCol, c);
    for (const n of names) if (!col.has(n)) col.set(n, ++maxCol);
    const pos = new Map();
    const rowsIn = new Map();
    const order = [...names].sort((a, b) => col.get(a) - col.get(b) || natural(a, b));
    for (const n of order) {
      const c = col.get(n);
      const row = rowsIn.get(c) || 0;
      rowsIn.set(c, row + 1);
      pos.set(n, { col: c, row });
    }
    let rows = 0;
    for (const r of rowsIn.values()) rows = Math.max(rows, r);
    return { order, pos, cols: maxCol + 1, rows, nextOf };
  }

  const BOX_W = 230;
  const BOX_H = 150;
  const GAP_X = 64;
  const GAP_Y = 24;
  const PAD = 14;

  function renderPipeline() {
    const stages = state.stages && Array.isArray(state.stages.stages) ? state.stages.stages : null;
    const diagram = $('#pipeline-diagram');
    const table = $('#pipeline-table');
    renderPipelineMeta();
    if (!stages) {
      fill(diagram, el('p', { class: 'loading' }, 'Loading stages\u2026'));
      table.replaceChildren();
      return;
    }
    if (!stages.length) {
      fill(diagram, el('p', { class: 'empty' }, 'No stages known yet.'));
      table.replaceChildren();
      $('#pipeline-bottleneck').hidden = true;
      renderMoves();
      return;
    }
    const byName = new Map(stages.map((s) => [s.name, s]));
    const layout = pipelineLayout(stages);
    const bottleneck = state.stages.bottleneck || null;
    const isBottleneck = (s) => s.bottleneck || (bottleneck && bottleneck.stage === s.name);

    const width = PAD * 2 + layout.cols * BOX_W + Math.max(0, layout.cols - 1) * GAP_X;
    const height = PAD * 2 + layout.rows * BOX_H + Math.max(0, layout.rows - 1) * GAP_Y;
    const xy = (name) => {
      const p = layout.pos.get(name);
      return { x: PAD + p.col * (BOX_W + GAP_X), y: PAD + p.row * (BOX_H + GAP_Y) };
    };
    const svg = svgEl('svg', {
      id: 'pipeline-svg', xmlns: SVG_NS, width, height, viewBox: `0 0 ${width} ${height}`,
      role: 'img', 'aria-label': `Pipeline: ${layout.order.join(', ')}`,
    },
    svgEl('defs', null,
      svgEl('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 8, markerHeight: 8, orient: 'auto-start-reverse' },
        svgEl('path', { class: 'arrow-head', d: 'M0,0 L10,5 L0,10 z' }))));

    // Edges first, so boxes sit on top.
    for (const name of layout.order) {
      const next = layout.nextOf(name);
      if (!next) continue;
      const a = xy(name);
      const b = xy(next);
      const sx = a.x + BOX_W, sy = a.y + BOX_H / 2;
      const tx = b.x, ty = b.y + BOX_H / 2;
      let d;
      if (tx > sx) {
        const dx = (tx - sx) / 2;
        d = `M${sx},${sy} C${sx + dx},${sy} ${tx - dx},${ty} ${tx},${ty}`;
      } else {
        d = `M${sx},${sy} C${sx + 50},${sy + BOX_H} ${tx - 50},${ty + BOX_H} ${tx},${ty}`;
      }
      svg.appendChild(svgEl('path', { class: 'edge', d, 'marker-end': 'url(#arrow)', 'data-from': name, 'data-to': next }));
    }

    for (const name of layout.order) {
      const s = byName.get(name);
      const { x, y } = xy(name);
      const plan = scalingFor(name);
      const bn = isBottleneck(s);
      const q = s.queue || null;
      const p95 = s.processing_ms ? s.processing_ms.p95 : null;
      const current = plan ? plan.current_workers : (s.workers ? s.workers.alive : null);
      const recommended = plan ? plan.recommended_workers : s.recommended_workers;
      const lines = [
        ['queue ready / unacked', `${q ? fmtInt(q.ready) : DASH} / ${q && q.unacked != null ? fmtInt(q.unacked) : DASH}`],
        ['in flight / capacity', `${fmtInt(s.in_flight)} / ${fmtInt(s.capacity)}`],
        ['rate in / out', `${fmtRate(s.arrival_rate)} / ${fmtRate(s.completion_rate)}`],
        ['p95 processing', fmtMs(p95)],
        ['workers now / rec.', `${current == null ? DASH : current} / ${recommended == null ? DASH : recommended}`, isNum(current) && isNum(recommended) && recommended > current],
        ['utilisation', fmtPct(s.utilisation, 0), isNum(s.utilisation) && s.utilisation >= 0.9],
      ];
      const titleText = [name, bn && bottleneck && bottleneck.stage === name ? `Bottleneck: ${bottleneck.reason}` : bn ? 'Bottleneck' : null,
        plan && plan.reason ? `Scaling: ${plan.reason}` : null].filter(Boolean).join('\n');
      const g = svgEl('g', { class: ['stage-node', bn && 'bottleneck'], 'data-stage': name, transform: `translate(${x},${y})` },
        svgEl('title', null, titleText),
        svgEl('rect', { class: 'stage-box', width: BOX_W, height: BOX_H, rx: 6, ry: 6 }),
        svgEl('text', { class: 'stage-name', x: 10, y: 21 }, truncate(name, bn ? 17 : 27)));
      if (bn) {
        g.appendChild(svgEl('rect', { class: 'bn-label-bg', x: BOX_W - 84, y: 8, width: 76, height: 17, rx: 3, ry: 3 }));
        g.appendChild(svgEl('text', { class: 'bn-label', x: BOX_W - 46, y: 20, 'text-anchor': 'middle' }, 'BOTTLENECK'));
      }
      lines.forEach(([k, v, hot], i) => {
        const ly = 44 + i * 17.5;
        g.appendChild(svgEl('text', { class: 'stage-k', x: 10, y: ly }, k));
        g.appendChild(svgEl('text', { class: ['stage-v', hot && 'hot'], x: BOX_W - 10, y: ly, 'text-anchor': 'end' }, v));
      });
      svg.appendChild(g);
    }
    fill(diagram, svg);

    const note = $('#pipeline-bottleneck');
    if (bottleneck) {
      fill(note, el('b', null, 'Bottleneck: '), el('span', { class: 'bn-stage' }, bottleneck.stage), ' \u2013 ',
        el('span', { class: 'bn-reason' }, bottleneck.reason));
      note.hidden = false;
    } else {
      note.hidden = true;
    }

    const headers = ['Stage', 'Ready', 'Unacked', 'Consumers', 'In flight / cap.', 'In', 'Out',
      'p50', 'p95', 'p99', 'Wait p95', 'Success', 'Retried', 'Dead', 'Util.', 'Workers now / desired / rec.', 'Expected wait', 'Backlog age', ''];
    const numeric = (i) => i > 0 && i < headers.length - 1;
    const rows = [];
    for (const name of layout.order) {
      const s = byName.get(name);
      const plan = scalingFor(name);
      const q = s.queue || null;
      const p = s.processing_ms || null;
      const bn = isBottleneck(s);
      const cells = [
        el('span', null, name, bn ? el('span', { class: 'tag' }, 'bottleneck') : null,
          s.rate_limit ? el('span', { class: 'tag rate-limit', title: `rate limit: ${fmtRate(s.rate_limit.achieved_per_second)} started over the last 10 s` }, `\u2264 ${s.rate_limit.limit}`) : null),
        q ? fmtInt(q.ready) : DASH,
        q && q.unacked != null ? fmtInt(q.unacked) : DASH,
        q ? fmtInt(q.consumers) : DASH,
        `${fmtInt(s.in_flight)} / ${fmtInt(s.capacity)}`,
        fmtRate(s.arrival_rate),
        fmtRate(s.completion_rate),
        p ? fmtMs(p.p50) : DASH,
        p ? fmtMs(p.p95) : DASH,
        p ? fmtMs(p.p99) : DASH,
        s.queue_wait_ms ? fmtMs(s.queue_wait_ms.p95) : DASH,
        fmtPct(s.success_rate),
        fmtInt(s.retried),
        fmtInt(s.dead_lettered),
        fmtPct(s.utilisation, 0),
        plan
          ? `${plan.current_workers} / ${plan.desired_workers} / ${plan.recommended_workers}`
          : `${s.workers ? s.workers.alive : DASH} / ${DASH} / ${s.recommended_workers == null ? DASH : s.recommended_workers}`,
        fmtMs(s.expected_wait_ms),
        fmtMs(s.backlog_age_ms),
        el('span', { class: 'group-actions' }, stageActionButtons(name)),
      ];
      rows.push(el('tr', { class: ['stage-row', bn && 'bottleneck'], 'data-stage': name },
        cells.map((c, i) => el('td', { class: numeric(i) ? 'num' : null }, c))));
      const reasons = [];
      if (plan && plan.reason) reasons.push(el('span', { class: 'scaling-reason' }, plan.reason));
      if (plan && plan.forecast) {
        const f = plan.forecast;
        reasons.push(el('span', null, ` (forecast ${fmtRate(f.rate)}, ${fmtRate(f.lower)}..${fmtRate(f.upper)}, ${String(f.source || '').replace('_', ' ')}${isNum(f.mase) ? `, MASE ${fmtNum(f.mase)}` : ''})`));
      }
      if (bn && bottleneck && bottleneck.stage === name) {
        reasons.push(el('span', null, reasons.length ? ' \u00b7 ' : '', 'bottleneck: ', bottleneck.reason));
      }
      rows.push(el('tr', { class: 'reason-row', 'data-stage': name },
        el('td', { colspan: headers.length }, reasons.length ? reasons : el('span', { class: 'none' }, 'not planned yet'))));
    }
    fill(table,
      el('thead', null, el('tr', null, headers.map((h, i) => el('th', { class: numeric(i) ? 'num' : null }, h)))),
      el('tbody', null, rows));
    renderMoves();
    renderBands(layout.order, byName);
  }

  function renderPipelineMeta() {
    const meta = $('#pipeline-meta');
    const sc = state.scaling;
    if (!sc) { meta.replaceChildren(); return; }
    fill(meta,
      el('span', null, 'wait target ', el('b', null, fmtMs(sc.wait_target_ms))),
      el('span', null, 'quantile ', el('b', null, fmtPct(isNum(sc.wait_quantile) ? 1 - sc.wait_quantile : null, 0)),
        ' within target'),
      el('span', null, 'lead time ', el('b', null, fmtMs(sc.lead_time_ms))),
      sc.dry_run ? el('span', { class: 'tag tag-muted' }, 'scaling dry run') : null);
  }

  function renderMoves() {
    const box = $('#pipeline-moves');
    const moves = state.scaling && Array.isArray(state.scaling.moves) ? state.scaling.moves : [];
    const manual = state.scaling && Array.isArray(state.scaling.manual) ? state.scaling.manual : [];
    if (!moves.length && !manual.length) { box.replaceChildren(); return; }
    const recent = moves.slice(-20).reverse();
    const byHand = manual.slice(-20).reverse();
    fill(box,
      recent.length ? el('h3', { class: 'section-title' }, 'Recent moves') : null,
      recent.length ? el('div', { class: 'table-wrap' },
        el('table', { class: 'data-table', id: 'moves-table' },
          el('thead', null, el('tr', null, ['When', 'Worker', 'From', 'To', 'Why'].map((h) => el('th', null, h)))),
          el('tbody', null, recent.map((m) => el('tr', { class: 'move-row' },
            el('td', null, agoNode(m.at_ms)), el('td', { class: 'mono' }, m.worker), el('td', null, m.from),
            el('td', null, m.to), el('td', null, m.reason)))))) : null,
      byHand.length ? el('h3', { class: 'section-title' }, 'Scaled by hand') : null,
      byHand.length ? el('div', { class: 'table-wrap' },
        el('table', { class: 'data-table', id: 'manual-scale-table' },
          el('thead', null, el('tr', null, ['When', 'Stage', 'Workers', 'Carried out'].map((h) => el('th', null, h)))),
          el('tbody', null, byHand.map((m) => el('tr', { class: 'manual-scale-row' },
            el('td', null, agoNode(m.at_ms)), el('td', { class: 'mono' }, m.stage),
            el('td', null, `${m.from} \u2192 ${m.to}`),
            el('td', null, m.dry_run ? 'dry run: logged only' : 'through the actuator')))))) : null);
  }

  // =====================================================================
  // Task view
  // =====================================================================

  const TASK_LIVE = ['queued', 'running', 'retrying', 'scheduled', 'held', 'waiting'];

  async function loadTask(id, { quiet = false } = {}) {
    const seq = ++state.task.seq;
    stopTaskRefresh();
    if (id !== state.task.id) {
      state.task.id = id;
      state.task.data = null;
      state.task.error = null;
      if (state.view === 'task') fill($('#task-result'), el('p', { class: 'loading' }, `Looking up ${id}\u2026`));
    }
    try {
      const data = await api(`/api/tasks/${enc(id)}`);
      if (seq !== state.task.seq) return;
      state.task.data = data;
      state.task.error = null;
    } catch (e) {
      if (seq !== state.task.seq) return;
      if (!quiet || !state.task.data) {
        state.task.data = null;
        state.task.error = e;
      }
    }
    invalidate('task');
    scheduleTaskRefresh();
  }

  /** While the task is not finished and shown, it is fetched every 2 s. */
  function scheduleTaskRefresh() {
    stopTaskRefresh();
    const d = state.task.data;
    const live = d && TASK_LIVE.includes(d.status);
    setText($('#task-refresh-note'), live ? 'refreshing every 2 s while it runs' : '');
    if (!live || state.view !== 'task') return;
    state.task.timer = setTimeout(() => {
      if (state.view === 'task' && state.task.id) loadTask(state.task.id, { quiet: true });
    }, 2000);
  }

  function stopTaskRefresh() {
    clearTimeout(state.task.timer);
    state.task.timer = null;
  }

  function renderTask() {
    const box = $('#task-result');
    const { id, data, error } = state.task;
    if (!id) {
      fill(box, el('p', { class: 'empty' }, 'Enter a task id, or click a task on a worker card.'));
      syncFlow();
      return;
    }
    if (error) {
      fill(box, el('div', { class: 'error-box task-error' }, error.message));
      syncFlow();
      return;
    }
    if (!data) return; // loading
    const now = serverNow();
    const attempts = Array.isArray(data.attempts) ? data.attempts : [];
    const eta = isNum(data.eta_in_ms)
      ? el('span', { class: 'eta' }, `in ${fmtMs(data.eta_in_ms)}`,
        isNum(data.eta_low_in_ms) && isNum(data.eta_high_in_ms)
          ? ` (${fmtMs(data.eta_low_in_ms)} \u2013 ${fmtMs(data.eta_high_in_ms)})` : null,
        isNum(data.eta_at_ms) ? el('span', { class: 'summary' }, ` at ${fmtClock(data.eta_at_ms)}`) : null)
      : DASH;
    const fact = (label, value) => el('div', null, el('dt', null, label), el('dd', null, value));
    fill(box,
      el('div', { class: 'task-head', 'data-task-id': data.id, 'data-status': data.status },
        el('span', { class: 'task-id' }, data.id),
        el('span', { class: ['badge', 'task-status', outcomeClass(data.status)] }, data.status),
        priorityBadge(data.priority),
        el('span', null, 'at stage ', el('b', { class: 'task-stage' }, data.stage))),
      el('dl', { class: 'facts' },
        fact('ETA', eta),
        fact('Submitted', isNum(data.submitted_at_ms) ? agoNode(data.submitted_at_ms) : DASH),
        fact('Last event', isNum(data.updated_at_ms) ? agoNode(data.updated_at_ms) : DASH),
        fact('Finished', isNum(data.finished_at_ms) ? fmtClock(data.finished_at_ms) : DASH),
        fact('Duration', fmtMs(data.duration_ms)),
        fact('Attempts', String(attempts.length)),
        fact('Priority', isNum(data.priority) ? `${data.priority} (band ${data.band || DASH})` : DASH),
        isNum(data.due_at_ms) ? fact(data.status === 'scheduled' ? 'Due' : 'Was due', dueNode(data.due_at_ms)) : null),
      cancelBox(data),
      flowSection(data),
      renderTimeline(attempts, data, now));
    syncFlow();
  }

  // ---- cancelling tasks (issue 18) ----

  /** The task page's cancel control: a button, then a confirmation. */
  function cancelBox(task) {
    const c = task.cancel;
    if (c) {
      const how = c.state === 'cancelled'
        ? `cancelled by ${c.by} while ${c.point}`
        : c.state === 'already_finished'
          ? `cancel asked by ${c.by}: already finished`
          : `cancel requested by ${c.by}, waiting for its agent`;
      return el('p', { class: 'cancel-state summary', 'data-cancel-state': c.state }, how,
        isNum(c.requested_at_ms) ? ` (asked ${fmtClock(c.requested_at_ms)})` : null);
    }
    if (!TASK_LIVE.includes(task.status)) return null;
    // The confirmation survives the page's refreshes (every 2 s).
    const asking = (on) => { cancelAsked = on ? task.id : null; invalidate('task'); };
    if (cancelAsked !== task.id) {
      return el('div', { class: 'cancel-box toolbar' },
        el('button', { type: 'button', class: 'btn btn-danger', id: 'task-cancel', onclick: () => asking(true) },
          'Cancel task\u2026'));
    }
    return el('div', { class: 'cancel-box toolbar' },
      el('span', null, `Cancel ${task.id}? A queued task never starts; a running one is stopped and not retried.`),
      el('button', {
        type: 'button', class: 'btn btn-danger', id: 'task-cancel-confirm',
        onclick: () => { cancelAsked = null; cancelTask(task.id); },
      }, 'Yes, cancel it'),
      el('button', { type: 'button', class: 'btn', id: 'task-cancel-keep', onclick: () => asking(false) }, 'Keep it'));
  }

  /** The task whose cancel is being confirmed, if any. */
  let cancelAsked = null;

  async function cancelTask(id) {
    try {
      const r = await api(`/api/tasks/${enc(id)}`, { method: 'DELETE', interactive: true });
      toast(`Cancel of ${id} requested (${r && r.status ? r.status : 'queued'}).`);
    } catch (e) {
      toastError(e, `Cannot cancel ${id}`);
    }
    loadTask(id, { quiet: true });
  }

  /** Bulk cancel by filter: a dry-run count first, then the cancel. */
  function setupBulkCancel() {
    const stage = el('input', { type: 'text', id: 'bulk-stage', placeholder: 'stage', 'aria-label': 'Stage' });
    const status = el('select', { id: 'bulk-status', 'aria-label': 'Status' },
      ['', 'queued', 'running', 'retrying'].map((s) => el('option', { value: s }, s || 'any status')));
    const prefix = el('input', { type: 'text', id: 'bulk-prefix', placeholder: 'id prefix', 'aria-label': 'Id prefix' });
    const result = el('span', { id: 'bulk-result', class: 'summary' });
    const filter = () => {
      const f = {};
      if (stage.value.trim()) f.stage = stage.value.trim();
      if (status.value) f.status = status.value;
      if (prefix.value.trim()) f.prefix = prefix.value.trim();
      return f;
    };
    const run = async (dryRun) => {
      try {
        const r = await api('/api/tasks/cancel', { method: 'POST', body: { ...filter(), dry_run: dryRun }, interactive: true });
        if (dryRun) {
          fill(result, `${r.count} task(s) match. `, r.count > 0 ? el('button', {
            type: 'button', class: 'btn btn-danger', id: 'bulk-confirm',
            onclick: () => run(false),
          }, `Cancel ${r.count} task(s)`) : null);
        } else {
          fill(result, `${r.cancelled} of ${r.count} task(s) cancelled.`);
        }
      } catch (e) {
        fill(result, el('span', { class: 'error-text' }, e.message));
      }
    };
    const form = el('form', { id: 'bulk-cancel', class: 'toolbar', autocomplete: 'off' },
      el('b', null, 'Cancel tasks by filter:'), stage, status, prefix,
      el('button', { type: 'submit', class: 'btn', id: 'bulk-count' }, 'Count'), result);
    form.addEventListener('submit', (e) => { e.preventDefault(); fill(result); run(true); });
    $('#view-task').appendChild(form);
  }

  function renderTimeline(attempts, task, now) {
    if (!attempts.length) return el('p', { class: 'empty' }, 'No attempts recorded.');
    const startOf = (a) => [a.queued_at_ms, a.started_at_ms, a.finished_at_ms].find(isNum);
    const endOf = (a) => {
      if (isNum(a.finished_at_ms)) return a.finished_at_ms;
      if (isNum(a.started_at_ms)) {
        if (a.outcome === 'running') return Math.max(now, a.started_at_ms);
        return a.started_at_ms + (isNum(a.duration_ms) ? a.duration_ms : 0);
      }
      if (isNum(a.queued_at_ms)) return a.outcome === 'queued' ? Math.max(now, a.queued_at_ms) : a.queued_at_ms + (a.wait_ms || 0);
      return null;
    };
    let t0 = isNum(task.submitted_at_ms) ? task.submitted_at_ms : Infinity;
    let t1 = -Infinity;
    for (const a of attempts) {
      const s = startOf(a), e = endOf(a);
      if (isNum(s)) t0 = Math.min(t0, s);
      if (isNum(e)) t1 = Math.max(t1, e);
    }
    if (!isNum(t0)) t0 = 0;
    if (!isNum(t1) || t1 <= t0) t1 = t0 + 1;
    const span = t1 - t0;
    const X = (t) => Math.max(0, Math.min(1000, ((t - t0) / span) * 1000));

    const rows = attempts.map((a, i) => {
      const bars = svgEl('svg', { viewBox: '0 0 1000 14', preserveAspectRatio: 'none', 'aria-hidden': 'true' },
        svgEl('rect', { class: 'bar-track', x: 0, y: 3, width: 1000, height: 8 }));
      const queued = isNum(a.queued_at_ms) ? a.queued_at_ms : null;
      const started = isNum(a.started_at_ms) ? a.started_at_ms : null;
      if (queued != null) {
        const waitEnd = started != null ? started : (a.outcome === 'queued' ? now : queued + (a.wait_ms || 0));
        const x = X(queued);
        bars.appendChild(svgEl('rect', { class: 'bar-wait', x, y: 3, width: Math.max(1, X(waitEnd) - x), height: 8 }));
      }
      if (started != null) {
        const end = endOf(a);
        const x = X(started);
        bars.appendChild(svgEl('rect', { class: ['bar-run', outcomeClass(a.outcome)], x, y: 1, width: Math.max(2, X(end) - x), height: 12 }));
      }
      const extra = [];
      if (a.redelivered) extra.push('redelivered');
      if (isNum(a.progress) && a.outcome === 'running') extra.push(`${fmtPct(a.progress, 0)} done`);
      if (a.stale_result) extra.push(`stale result: ${a.stale_result}`);
      if (isNum(a.due_at_ms)) extra.push(`due ${fmtClock(a.due_at_ms)}`);
      return el('tr', { class: 'attempt-row', 'data-stage': a.stage, 'data-attempt': a.attempt, 'data-outcome': a.outcome, 'data-index': i },
        el('td', null, a.stage),
        el('td', { class: 'num' }, String(a.attempt)),
        el('td', { class: 'mono' }, a.worker || DASH),
        el('td', { class: 'num' }, fmtMs(a.wait_ms)),
        el('td', { class: 'num' }, fmtMs(a.duration_ms)),
        el('td', null, el('span', { class: ['badge', outcomeClass(a.outcome)] }, a.outcome),
          extra.length ? el('span', { class: 'summary' }, ` ${extra.join(', ')}`) : null),
        el('td', null,
          a.error_class ? el('span', { class: 'attempt-error-class' }, a.error_class) : null,
          a.redacted && a.error == null ? hiddenText()
            : a.error ? el('span', { class: 'attempt-error' }, a.error) : (a.error_class ? null : el('span', { class: 'none' }, DASH))),
        el('td', { class: 'bar-cell', title: `${a.stage} #${a.attempt}: wait ${fmtMs(a.wait_ms)}, run ${fmtMs(a.duration_ms)}` }, bars));
    });
    return el('div', null,
      el('div', { class: 'table-wrap' },
        el('table', { class: 'data-table timeline', id: 'task-timeline' },
          el('thead', null, el('tr', null,
            ['Stage', '#', 'Worker', 'Wait', 'Duration', 'Outcome', 'Error'].map((h, i) => el('th', { class: i === 1 || i === 3 || i === 4 ? 'num' : null }, h)),
            el('th', { class: 'bar-cell' }, el('span', { class: 'axis' }, el('span', null, '0'), el('span', null, fmtMs(span)))))),
          el('tbody', null, rows))),
      el('div', { class: 'legend' },
        el('span', null, el('span', { class: 'swatch swatch-wait' }), 'waiting in the queue'),
        el('span', null, el('span', { class: 'swatch swatch-run' }), 'processing'),
        el('span', null, el('span', { class: 'swatch swatch-fail' }), 'failed')));
  }

  // =====================================================================
  // Priorities and scheduled tasks (issue 18): a task's priority badge and
  // due time, the task lists by status, each stage's priority bands.
  // =====================================================================

  /** A task's priority as a badge, coloured by band. */
  function priorityBadge(priority) {
    if (!isNum(priority)) return null;
    const band = priority >= 7 ? 'high' : priority >= 4 ? 'mid' : 'low';
    return el('span', { class: ['badge', 'prio', `prio-${band}`], 'data-priority': String(priority), title: `priority ${priority} (0-9, higher first)` },
      `priority ${priority}`);
  }

  /** A due time: the clock time, and how far off it is. */
  function dueNode(atMs) {
    const left = atMs - serverNow();
    return el('span', { class: 'due', 'data-due-at': String(atMs) }, fmtClock(atMs),
      el('span', { class: 'summary' }, left > 0 ? ` (in ${fmtMs(left)})` : ` (${fmtMs(-left)} ago)`));
  }

  const taskList = { status: 'scheduled', body: null, error: null, seq: 0, at: 0 };

  /** Refetches the task list when the stages change, at most every 2 s. */
  function refreshTaskList() {
    if (Date.now() - taskList.at < 2000) return;
    loadTaskList();
  }

  /** Fetches the task list of the chosen status (on the Task view). */
  async function loadTaskList() {
    const sel = $('#task-list-status');
    if (!sel) return;
    taskList.status = sel.value || 'scheduled';
    taskList.at = Date.now();
    const seq = ++taskList.seq;
    try {
      const body = await api(`/api/tasks?status=${enc(taskList.status)}&limit=100`);
      if (seq !== taskList.seq) return;
      taskList.body = body;
      taskList.error = null;
    } catch (e) {
      if (seq !== taskList.seq) return;
      taskList.error = e;
    }
    renderTaskList();
  }

  function renderTaskList() {
    const box = $('#task-list');
    if (!box) return;
    if (taskList.error) {
      fill(box, el('div', { class: 'error-box' }, taskList.error.message));
      return;
    }
    const tasks = taskList.body && Array.isArray(taskList.body.tasks) ? taskList.body.tasks : null;
    if (!tasks) { fill(box, el('p', { class: 'loading' }, 'Loading\u2026')); return; }
    if (!tasks.length) { fill(box, el('p', { class: 'empty' }, `No ${taskList.status} tasks.`)); return; }
    const rows = tasks.map((t) => el('tr', { class: 'task-list-row', 'data-task-id': t.id, 'data-status': t.status, 'data-priority': String(t.priority) },
      el('td', { class: 'mono' }, taskLink(t.id), ' ', flowBadge(t)),
      el('td', null, el('span', { class: ['badge', outcomeClass(t.status)] }, t.status)),
      el('td', { class: 'num' }, isNum(t.priority) ? String(t.priority) : DASH),
      el('td', null, t.stage),
      el('td', null, isNum(t.due_at_ms) && t.status === 'scheduled' ? dueNode(t.due_at_ms) : DASH),
      el('td', { class: 'num' }, isNum(t.eta_in_ms) ? fmtMs(t.eta_in_ms) : DASH),
      el('td', null, isNum(t.updated_at_ms) ? agoNode(t.updated_at_ms) : DASH)));
    fill(box, el('div', { class: 'table-wrap' },
      el('table', { class: 'data-table', id: 'task-list-table' },
        el('thead', null, el('tr', null, ['Task', 'Status', 'Priority', 'Stage', 'Due', 'ETA', 'Last event']
          .map((h, i) => el('th', { class: i === 2 || i === 5 ? 'num' : null }, h)))),
        el('tbody', null, rows))));
  }

  /** Each stage's priority bands: depth, queued, waits, targets; scheduled. */
  function renderBands(order, byName) {
    const box = $('#pipeline-bands');
    if (!box) return;
    const bandCell = (b) => {
      if (!b) return DASH;
      const q = b.queue ? fmtInt(b.queue.ready) : DASH;
      const wait = b.wait_ms ? fmtMs(b.wait_ms.p95) : DASH;
      return el('span', { class: ['band-cell', b.active && 'band-active'], 'data-band': b.priority, title: `ready in the band queue / tasks known queued / p95 wait; wait target ${fmtMs(b.wait_target_ms)}` },
        `${q} / ${fmtInt(b.queued)} \u00b7 p95 ${wait}`);
    };
    const rows = order.map((name) => {
      const s = byName.get(name);
      const bands = Array.isArray(s.bands) ? s.bands : [];
      const by = (label) => bands.find((b) => b.priority === label);
      return el('tr', { class: 'band-row', 'data-stage': name },
        el('td', null, name),
        el('td', { class: 'num' }, bandCell(by('7-9'))),
        el('td', { class: 'num' }, bandCell(by('4-6'))),
        el('td', { class: 'num' }, bandCell(by('0-3'))),
        el('td', { class: 'num' }, s.intake ? fmtInt(s.intake.ready) : DASH),
        el('td', { class: 'num scheduled-count' }, fmtInt(s.scheduled || 0)),
        el('td', null, isNum(s.next_due_at_ms) ? dueNode(s.next_due_at_ms) : DASH));
    });
    fill(box,
      el('h3', { class: 'section-title' }, 'Priority bands'),
      el('div', { class: 'table-wrap' },
        el('table', { class: 'data-table', id: 'bands-table' },
          el('thead', null, el('tr', null, ['Stage', '7-9 ready / queued \u00b7 wait', '4-6 ready / queued \u00b7 wait', '0-3 ready / queued \u00b7 wait', 'Intake', 'Scheduled', 'Next due']
            .map((h, i) => el('th', { class: i > 0 && i < 6 ? 'num' : null }, h)))),
          el('tbody', null, rows))));
  }

  // =====================================================================
  // Flows (issue 19): a task's place in its flow (GET /api/tasks/{id}'s
  // `flow`, on the task's page) and the whole flow as a graph
  // (GET /api/flows/{id}), fetched every second while it is shown.
  //
  // The graph is layered left to right: dependencies and roots first, each
  // node one column right of everything it waits for. A fan-out's children
  // in one column are drawn as a grid of small squares from GRID_MIN of
  // them on (one bundled edge from the parent), so 2,000 nodes stay
  // readable. Fan-out edges are solid, dependency edges dashed. Every node
  // is a link to its task, with its id, status, stage and ETA as its
  // tooltip. An update that changes no node or edge only recolours and
  // retitles the nodes in place.
  // =====================================================================

  /** Every status a node of a flow can have, in the legend's order. */
  const FLOW_STATUSES = ['held', 'scheduled', 'queued', 'running', 'retrying', 'waiting',
    'succeeded', 'dead_lettered', 'cancelled', 'unknown'];
  const FLOW_FINISHED = ['succeeded', 'dead_lettered', 'cancelled'];
  const flowClass = (s) => 'fs-' + (FLOW_STATUSES.includes(s) ? s : 'unknown');

  const FN_W = 190; // a node drawn as a box
  const FN_H = 36;
  const FC = 12; // a cell of a grid of children
  const FC_GAP = 4;
  const GRID_MIN = 13; // children of one parent in one column drawn as a grid
  const GRID_HEAD = 20;
  const GRID_PAD = 6;
  const FL_GAP_X = 72;
  const FL_GAP_Y = 14;
  const FL_PAD = 12;

  const flow = {
    /** the task whose flow is shown */
    id: null,
    /** GET /api/flows/{id} body */
    data: null,
    error: null,
    timer: null,
    seq: 0,
    loading: false,
    /** nodes and edges of the drawn graph, to redraw only when they change */
    key: '',
    /** task id -> {g, title, sub, cls} of the drawn graph */
    refs: new Map(),
    countsKey: '',
    dom: null,
  };

  /** The Flow section of the task page: one set of nodes, kept across renders. */
  function flowDom() {
    if (flow.dom) return flow.dom;
    const facts = el('div', { id: 'flow-facts', class: 'flow-facts' });
    const meta = el('div', { id: 'flow-meta', class: 'meta-line' });
    const counts = el('div', { id: 'flow-counts', class: 'chips flow-counts' });
    const graph = el('div', { id: 'flow-graph', class: 'diagram flow-graph' });
    const legend = el('div', { class: 'legend flow-legend' },
      FLOW_STATUSES.map((s) => el('span', { 'data-status': s }, el('span', { class: ['swatch', flowClass(s)] }), s)),
      el('span', null, el('span', { class: 'swatch-line' }), 'fan-out'),
      el('span', null, el('span', { class: 'swatch-line dashed' }), 'runs after'));
    const root = el('section', { id: 'task-flow', class: 'flow-section', 'aria-label': 'Flow', hidden: true },
      el('h3', { class: 'section-title' }, 'Flow'), facts, meta, counts, graph, legend);
    flow.dom = { root, facts, meta, counts, graph };
    return flow.dom;
  }

  /** The task's Flow section (filled from its `flow`), or null if it is in none. */
  function flowSection(task) {
    const dom = flowDom();
    const f = task.flow;
    dom.root.hidden = !f;
    if (!f) return null;
    const item = (cls, label, ...value) =>
      el('div', { class: ['flow-fact', cls] }, el('span', { class: 'flow-k' }, label), ' ', value);
    const items = [];
    if (f.root && f.root !== task.id) items.push(item('flow-root', 'Root', taskLink(f.root)));
    if (f.parent) {
      items.push(item('flow-parent', 'Parent', taskLink(f.parent), isNum(f.index) ? ` (child ${f.index})` : null));
    }
    if (f.children) {
      const c = f.children;
      const ended = Object.entries(c.ended || {}).map(([k, n]) => `${fmtInt(n)} ${k}`).join(', ');
      items.push(item('flow-children', 'Children', el('b', null, fmtInt(c.total)),
        ended ? ` \u00b7 ended: ${ended}` : ' \u00b7 none ended yet',
        c.join ? [' \u00b7 joins at ', el('b', null, c.join)] : ' \u00b7 finishes with them',
        c.on_child_failure ? ` \u00b7 a failed child: ${c.on_child_failure}` : null, ' ',
        el('span', { class: ['badge', 'flow-state', c.state === 'dead_lettered' ? 'oc-dead_lettered' : c.state === 'waiting' ? 'oc-waiting' : 'oc-succeeded'], 'data-state': c.state }, c.state)));
    }
    const after = Array.isArray(f.after) ? f.after : [];
    if (after.length) {
      items.push(item('flow-after', 'Runs after',
        after.map((d, i) => el('span', { class: 'flow-dep', 'data-task-id': d.id, 'data-waiting': String(!!d.waiting) },
          i ? ', ' : null, taskLink(d.id), ' ', el('span', { class: ['badge', outcomeClass(d.status)] }, d.status),
          d.waiting ? ' (waiting for it)' : null)),
        f.on_dependency_failure ? ` \u00b7 if one fails: ${f.on_dependency_failure}` : null));
    }
    const waiting = Array.isArray(f.waiting_for) ? f.waiting_for : [];
    if (waiting.length) items.push(item('flow-waiting', 'Waiting for', waiting.join(', ')));
    const dependents = Array.isArray(f.dependents) ? f.dependents : [];
    if (dependents.length) {
      items.push(item('flow-dependents', 'Run after it', dependents.map((d, i) => [i ? ', ' : null, taskLink(d)])));
    }
    if (f.failed_because != null || f.redacted) {
      items.push(item('flow-failed', 'Failed because',
        el('span', { class: 'flow-failed-text' }, workerText(f.failed_because, f.redacted, DASH))));
    }
    fill(dom.facts, items);
    return dom.root;
  }

  /** The task whose flow should be fetched now, or null. */
  function flowWanted() {
    const d = state.task.data;
    return state.view === 'task' && d && d.flow && !document.hidden ? d.id : null;
  }

  /** Starts, keeps or stops fetching the flow, after the task or the view changed. */
  function syncFlow() {
    const want = flowWanted();
    if (!want) {
      clearTimeout(flow.timer);
      flow.timer = null;
      const d = state.task.data;
      if (!d || !d.flow || d.id !== flow.id) resetFlow();
      return;
    }
    if (want !== flow.id) {
      // Another task: keep the drawing if it is of the same flow.
      const root = state.task.data.flow.root;
      if (!flow.data || flow.data.root !== root) resetFlow();
      flow.id = want;
      loadFlow();
    } else if (!flow.timer && !flow.loading) {
      loadFlow();
    }
  }

  function resetFlow() {
    flow.seq++;
    clearTimeout(flow.timer);
    Object.assign(flow, { id: null, data: null, error: null, timer: null, loading: false, key: '', countsKey: '' });
    flow.refs.clear();
    if (flow.dom) {
      flow.dom.graph.replaceChildren();
      flow.dom.meta.replaceChildren();
      flow.dom.counts.replaceChildren();
    }
  }

  const flowFinished = (data) => Object.keys(data.counts || {}).every((s) => FLOW_FINISHED.includes(s));

  async function loadFlow() {
    const id = flow.id;
    if (!id) return;
    const seq = ++flow.seq;
    clearTimeout(flow.timer);
    flow.timer = null;
    flow.loading = true;
    let data = null;
    let error = null;
    try {
      data = await api(`/api/flows/${enc(id)}`, { allow404: true });
    } catch (e) {
      error = e;
    }
    if (seq !== flow.seq) return;
    flow.loading = false;
    if (error) flow.error = error;
    else { flow.data = data; flow.error = null; }
    renderFlow();
    if (flowWanted() === id) {
      // A finished flow changes no more: looked at again now and then.
      const every = flow.data && flowFinished(flow.data) ? 5000 : 1000;
      flow.timer = setTimeout(() => {
        flow.timer = null;
        if (flowWanted() === flow.id) loadFlow();
      }, every);
    }
  }

  function renderFlow() {
    const dom = flowDom();
    const data = flow.data;
    if (flow.error) {
      // The last drawing stays; the meta line says why it is not refreshed.
      fill(dom.meta, el('span', { class: 'error-text' }, `Flow: ${flow.error.message}`));
      return;
    }
    if (!data || !Array.isArray(data.nodes)) {
      fill(dom.meta, el('span', { class: 'none' }, flow.loading ? 'Loading the flow\u2026' : 'Not in a flow.'));
      dom.graph.replaceChildren();
      dom.counts.replaceChildren();
      flow.key = '';
      flow.countsKey = '';
      flow.refs.clear();
      return;
    }
    const done = flowFinished(data);
    const eta = done
      ? 'finished'
      : isNum(data.eta_in_ms)
        ? [`ETA ${fmtMs(data.eta_in_ms)}`,
          isNum(data.eta_low_in_ms) && isNum(data.eta_high_in_ms)
            ? ` (${fmtMs(data.eta_low_in_ms)} \u2013 ${fmtMs(data.eta_high_in_ms)})` : null]
        : 'ETA unknown (no timings yet)';
    fill(dom.meta,
      el('span', null, 'root ', taskLink(data.root)),
      el('span', { id: 'flow-total', 'data-total': String(data.total) }, el('b', null, fmtInt(data.total)), ` task${data.total === 1 ? '' : 's'}`),
      el('span', { id: 'flow-eta' }, eta),
      data.truncated
        ? el('span', { id: 'flow-truncated', class: 'tag tag-muted', title: 'The graph lists the first tasks only; the counts cover them all.' },
          `truncated: ${fmtInt(data.nodes.length)} of ${fmtInt(data.total)} drawn`)
        : null);
    const counts = data.counts || {};
    const rank = (s) => { const i = FLOW_STATUSES.indexOf(s); return i < 0 ? 99 : i; };
    const statuses = Object.keys(counts).sort((a, b) => rank(a) - rank(b) || natural(a, b));
    const countsKey = statuses.map((s) => `${s}:${counts[s]}`).join(',');
    if (countsKey !== flow.countsKey) {
      flow.countsKey = countsKey;
      fill(dom.counts, statuses.map((s) =>
        el('span', { class: ['chip', 'flow-count', flowClass(s)], 'data-status': s, 'data-count': String(counts[s]) },
          `${fmtInt(counts[s])} ${s}`)));
    }
    drawFlow(dom.graph, data);
  }

  /** A node's tooltip. */
  function flowTitle(n) {
    const lines = [n.id, `status: ${n.status}`, `stage: ${n.stage || DASH}`];
    if (n.parent) lines.push(`child of ${n.parent}`);
    if (FLOW_FINISHED.includes(n.status)) {
      lines.push('ETA: finished');
    } else if (isNum(n.eta_in_ms)) {
      lines.push(`ETA: ${fmtMs(n.eta_in_ms)}${isNum(n.eta_low_in_ms) && isNum(n.eta_high_in_ms)
        ? ` (${fmtMs(n.eta_low_in_ms)} \u2013 ${fmtMs(n.eta_high_in_ms)})` : ''}`);
    } else {
      lines.push('ETA: unknown');
    }
    lines.push('Click to open this task.');
    return lines.join('\n');
  }

  /** A box node's second line. */
  function flowSub(n) {
    const parts = [n.status];
    if (n.stage) parts.push(n.stage);
    if (!FLOW_FINISHED.includes(n.status) && isNum(n.eta_in_ms)) parts.push(`ETA ${fmtMs(n.eta_in_ms)}`);
    return truncate(parts.join(' \u00b7 '), 34);
  }

  const flowNodeClass = (n, cell) =>
    ['fnode', cell ? 'fnode-cell' : 'fnode-box', flowClass(n.status), n.id === flow.id ? 'current' : null]
      .filter(Boolean).join(' ');

  /**
   * Columns (layers) of the graph: each node one right of the furthest
   * node it comes after; within a column, the order of what they come
   * after, then the list's (parents before children, children in order).
   */
  function flowLayout(nodes, edges) {
    const count = nodes.length;
    const index = new Map(nodes.map((n, i) => [n.id, i]));
    const preds = nodes.map(() => []);
    const succs = nodes.map(() => []);
    for (const e of edges) {
      const a = index.get(e.from);
      const b = index.get(e.to);
      if (a == null || b == null || a === b) continue;
      preds[b].push(a);
      succs[a].push(b);
    }
    const layer = new Array(count).fill(0);
    const indeg = preds.map((p) => p.length);
    const order = [];
    for (let i = 0; i < count; i++) if (!indeg[i]) order.push(i);
    const placed = new Array(count).fill(false);
    for (let head = 0; head < order.length; head++) {
      const i = order[head];
      placed[i] = true;
      for (const j of succs[i]) {
        layer[j] = Math.max(layer[j], layer[i] + 1);
        if (--indeg[j] === 0) order.push(j);
      }
    }
    // On a cycle (the coordinator dead-letters those): right of what is placed.
    for (let i = 0; i < count; i++) {
      if (placed[i]) continue;
      for (const p of preds[i]) if (placed[p]) layer[i] = Math.max(layer[i], layer[p] + 1);
    }
    // A fan-out's children in one column, counted, to draw as a grid.
    const siblings = new Map();
    for (let i = 0; i < count; i++) {
      const p = nodes[i].parent;
      if (p != null) {
        const k = `${layer[i]}\n${p}`;
        siblings.set(k, (siblings.get(k) || 0) + 1);
      }
    }
    const layers = [];
    const grids = new Map();
    const itemOf = new Array(count);
    for (let i = 0; i < count; i++) {
      const L = layer[i];
      if (!layers[L]) layers[L] = [];
      const p = nodes[i].parent;
      const k = p != null ? `${L}\n${p}` : null;
      let item;
      if (k && siblings.get(k) >= GRID_MIN) {
        item = grids.get(k);
        if (!item) {
          item = { grid: true, parent: p, members: [] };
          grids.set(k, item);
          layers[L].push(item);
        }
        item.members.push(i);
      } else {
        item = { grid: false, members: [i] };
        layers[L].push(item);
      }
      itemOf[i] = item;
    }
    // Order each column by where what its items come after stands.
    const rank = new Array(count).fill(0);
    for (let L = 0; L < layers.length; L++) {
      const items = layers[L] || [];
      if (L > 0) {
        const keyed = items.map((item, pos) => {
          let best = Infinity;
          for (const m of item.members) for (const p of preds[m]) if (layer[p] < L && rank[p] < best) best = rank[p];
          return { item, pos, best };
        });
        keyed.sort((a, b) => (a.best === b.best ? 0 : a.best < b.best ? -1 : 1) || a.pos - b.pos);
        layers[L] = keyed.map((k) => k.item);
      }
      (layers[L] || []).forEach((item, r) => item.members.forEach((m, j) => { rank[m] = r * 1e6 + j; }));
    }
    // Sizes, then places.
    const colW = [];
    const colH = [];
    for (let L = 0; L < layers.length; L++) {
      let w = 0;
      let h = 0;
      for (const item of layers[L] || []) {
        if (item.grid) {
          const n = item.members.length;
          item.cols = Math.max(8, Math.min(60, Math.ceil(Math.sqrt(n * 2))));
          item.rows = Math.ceil(n / item.cols);
          item.w = Math.max(FN_W, GRID_PAD * 2 + item.cols * (FC + FC_GAP) - FC_GAP);
          item.h = GRID_HEAD + GRID_PAD * 2 + item.rows * (FC + FC_GAP) - FC_GAP;
        } else {
          item.w = FN_W;
          item.h = FN_H;
        }
        w = Math.max(w, item.w);
        h += (h ? FL_GAP_Y : 0) + item.h;
      }
      colW.push(w);
      colH.push(h);
    }
    const height = FL_PAD * 2 + Math.max(FN_H, ...colH);
    const rects = new Array(count);
    let x = FL_PAD;
    for (let L = 0; L < layers.length; L++) {
      let y = FL_PAD + (height - FL_PAD * 2 - colH[L]) / 2;
      for (const item of layers[L] || []) {
        item.x = x;
        item.y = y;
        if (item.grid) {
          item.members.forEach((m, j) => {
            rects[m] = {
              x: x + GRID_PAD + (j % item.cols) * (FC + FC_GAP),
              y: y + GRID_HEAD + GRID_PAD + Math.floor(j / item.cols) * (FC + FC_GAP),
              w: FC,
              h: FC,
            };
          });
        } else {
          rects[item.members[0]] = { x, y, w: FN_W, h: FN_H };
        }
        y += item.h + FL_GAP_Y;
      }
      x += (colW[L] || 0) + FL_GAP_X;
    }
    const width = Math.max(FN_W + FL_PAD * 2, x - FL_GAP_X + FL_PAD);
    return { layers, rects, itemOf, index, width, height };
  }

  /** An edge's path from the right of `a` to the left of `b`. */
  function flowCurve(a, b) {
    const sx = a.x + a.w;
    const sy = a.y + a.h / 2;
    const tx = b.x;
    const ty = b.y + b.h / 2;
    if (tx > sx + 8) {
      const dx = (tx - sx) / 2;
      return `M${sx},${sy} C${sx + dx},${sy} ${tx - dx},${ty} ${tx},${ty}`;
    }
    return `M${sx},${sy} C${sx + 60},${sy + 70} ${tx - 60},${ty + 70} ${tx},${ty}`;
  }

  function drawFlow(box, data) {
    const nodes = data.nodes;
    const edges = Array.isArray(data.edges) ? data.edges : [];
    const key = JSON.stringify([nodes.map((n) => [n.id, n.parent]), edges.map((e) => [e.from, e.to, e.kind])]);
    if (key === flow.key && box.firstChild) {
      for (const n of nodes) {
        const ref = flow.refs.get(n.id);
        if (!ref) continue;
        const cls = flowNodeClass(n, ref.cell);
        if (ref.cls !== cls) {
          ref.g.setAttribute('class', cls);
          ref.cls = cls;
        }
        ref.g.setAttribute('data-status', n.status);
        setText(ref.title, flowTitle(n));
        if (ref.sub) setText(ref.sub, flowSub(n));
      }
      return;
    }
    flow.key = key;
    flow.refs.clear();
    const layout = flowLayout(nodes, edges);
    const { rects, itemOf, index, width, height } = layout;
    const svg = svgEl('svg', {
      id: 'flow-svg', xmlns: SVG_NS, width, height, viewBox: `0 0 ${width} ${height}`,
      role: 'group', 'aria-label': `Flow of ${data.root}: ${nodes.length} tasks drawn`,
    },
    svgEl('defs', null,
      ['flow-arrow', 'flow-arrow-after'].map((id) =>
        svgEl('marker', { id, viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' },
          svgEl('path', { class: id === 'flow-arrow' ? 'flow-arrow-head' : 'flow-arrow-head after', d: 'M0,0 L10,5 L0,10 z' })))));
    // Grid frames first, then edges, then nodes on top.
    for (const items of layout.layers) {
      for (const item of items || []) {
        if (!item.grid) continue;
        svg.appendChild(svgEl('g', { class: 'flow-grid', 'data-parent': item.parent, 'data-count': String(item.members.length) },
          svgEl('rect', { class: 'flow-grid-box', x: item.x, y: item.y, width: item.w, height: item.h, rx: 5, ry: 5 }),
          svgEl('text', { class: 'flow-grid-label', x: item.x + GRID_PAD, y: item.y + 14 },
            truncate(`${fmtInt(item.members.length)} children of ${item.parent}`, 34))));
      }
    }
    const bundled = new Set();
    for (const e of edges) {
      const a = index.get(e.from);
      const b = index.get(e.to);
      if (a == null || b == null || a === b) continue;
      const item = itemOf[b];
      if (e.kind === 'child' && item.grid && item.parent === e.from) {
        if (bundled.has(item)) continue;
        bundled.add(item);
        svg.appendChild(svgEl('path', {
          class: 'flow-edge edge-child edge-bundle', d: flowCurve(rects[a], { x: item.x, y: item.y, w: item.w, h: item.h }),
          'marker-end': 'url(#flow-arrow)', 'data-from': e.from, 'data-count': String(item.members.length),
        }));
        continue;
      }
      svg.appendChild(svgEl('path', {
        class: ['flow-edge', e.kind === 'after' ? 'edge-after' : 'edge-child'], d: flowCurve(rects[a], rects[b]),
        'marker-end': e.kind === 'after' ? 'url(#flow-arrow-after)' : 'url(#flow-arrow)', 'data-from': e.from, 'data-to': e.to, 'data-kind': e.kind,
      }));
    }
    nodes.forEach((n, i) => {
      const r = rects[i];
      const cell = itemOf[i].grid;
      const title = svgEl('title', null, flowTitle(n));
      const cls = flowNodeClass(n, cell);
      let g;
      let sub = null;
      if (cell) {
        g = svgEl('g', { class: cls, 'data-task-id': n.id, 'data-status': n.status },
          title, svgEl('rect', { class: 'fcell', x: r.x, y: r.y, width: r.w, height: r.h, rx: 2, ry: 2 }));
      } else {
        sub = svgEl('text', { class: 'fsub', x: 13, y: 29 }, flowSub(n));
        g = svgEl('g', { class: cls, 'data-task-id': n.id, 'data-status': n.status, transform: `translate(${r.x},${r.y})` },
          title,
          svgEl('rect', { class: 'fbox', width: r.w, height: r.h, rx: 5, ry: 5 }),
          svgEl('rect', { class: 'fbar', width: 6, height: r.h, rx: 2, ry: 2 }),
          svgEl('text', { class: 'fid', x: 13, y: 15 }, truncate(n.id, 27)),
          sub);
      }
      svg.appendChild(svgEl('a', { class: 'fnode-link', href: `#task/${enc(n.id)}`, 'aria-label': `${n.id}: ${n.status}` }, g));
      flow.refs.set(n.id, { g, title, sub, cls, cell });
    });
    fill(box, svg);
  }

  /**
   * A listed task's flow badge: the list says when a task is in a flow
   * (held, fanned out, or a fan-out's child) and its flow's root.
   */
  function flowBadge(t) {
    if (!t.flow_root) return null;
    let why = `in the flow of ${t.flow_root}`;
    if (t.status === 'held') why = 'held until the tasks it runs after finish';
    else if (t.status === 'waiting') why = 'fanned out: waiting for its children';
    return el('a', { class: ['badge', 'flow-badge'], href: `#task/${enc(t.id)}`, 'data-task-id': t.id, title: `${why}: open its flow` }, 'flow');
  }

  function setupTaskView() {
    document.addEventListener('visibilitychange', syncFlow);
    const listStatus = $('#task-list-status');
    if (listStatus) listStatus.addEventListener('change', loadTaskList);
    $('#task-form').addEventListener('submit', (e) => {
      e.preventDefault();
      const id = $('#task-search').value.trim();
      if (!id) return;
      const hash = `#task/${enc(id)}`;
      if (location.hash === hash) loadTask(id);
      else location.hash = hash;
    });
  }

  // =====================================================================
  // Errors view
  // =====================================================================

  function renderErrors() {
    const box = $('#errors-content');
    if (state.errorsMissing) {
      fill(box, el('p', { class: 'empty' }, 'This coordinator does not report error classes yet (GET /api/errors is not available).'));
      return;
    }
    if (!state.errors) {
      fill(box, el('p', { class: 'loading' }, 'Loading errors\u2026'));
      return;
    }
    const classes = Array.isArray(state.errors.classes) ? state.errors.classes : [];
    if (!classes.length) {
      fill(box, el('p', { class: 'empty' }, 'No errors recorded.'));
      return;
    }
    const byStage = new Map();
    for (const c of classes) {
      if (!byStage.has(c.stage)) byStage.set(c.stage, []);
      byStage.get(c.stage).push(c);
    }
    const stages = [...byStage.keys()].sort(compareStages);
    const rising = classes.filter((c) => c.rising).length;
    fill(box,
      el('div', { class: 'meta-line' },
        el('span', null, el('b', null, String(classes.length)), ` error class${classes.length === 1 ? '' : 'es'}`),
        rising ? el('span', null, el('b', null, String(rising)), ' rising') : null),
      stages.map((stage) => {
        const list = byStage.get(stage).slice().sort((a, b) =>
          (b.rising ? 1 : 0) - (a.rising ? 1 : 0) || (b.count || 0) - (a.count || 0) || natural(a.error_class, b.error_class));
        const total = list.reduce((n, c) => n + (c.count || 0), 0);
        return el('section', { class: 'error-stage', 'data-stage': stage },
          el('h3', null, stage, el('span', { class: 'group-count' }, ` \u00b7 ${fmtInt(total)} error${total === 1 ? '' : 's'}`)),
          list.map(renderErrorClass));
      }));
  }

  function renderErrorClass(c) {
    const samples = Array.isArray(c.samples) ? c.samples : [];
    return el('div', { class: ['error-class', c.rising && 'rising', c.new && 'is-new'], 'data-stage': c.stage, 'data-error-class': c.error_class, 'data-rising': String(!!c.rising) },
      el('div', { class: 'error-class-head' },
        el('span', { class: 'error-class-name' }, c.error_class,
          c.rising ? el('span', { class: 'tag tag-rising', title: 'More frequent than before' }, 'rising \u2191') : null,
          c.new ? el('span', { class: 'tag tag-new', title: 'First seen recently' }, 'new') : null),
        el('span', { class: 'error-stats' },
          el('span', null, el('b', null, fmtInt(c.count)), ' total'),
          el('span', null, el('b', null, fmtNum(c.rate_per_min, 1)), ' / min'),
          el('span', null, 'first ', agoNode(c.first_seen_ms)),
          el('span', null, 'last ', agoNode(c.last_seen_ms)))),
      samples.length
        ? el('ul', { class: 'error-samples' }, samples.map((s) =>
          el('li', { class: 'error-sample' },
            s.task_id ? taskLink(s.task_id) : el('span', { class: 'none' }, DASH),
            isNum(s.attempt) ? el('span', { class: 'summary', title: 'attempt at the stage' }, `#${s.attempt}`) : null,
            el('span', { class: 'error-message' }, workerText(s.message, s.redacted)),
            isNum(s.at_ms) ? agoNode(s.at_ms) : null)))
        : null);
  }

  // =====================================================================
  // Dead letters view
  // =====================================================================

  function fillDeadStages() {
    const select = $('#dead-stage');
    const names = stageOrder();
    if (state.dead.stage && !names.includes(state.dead.stage)) names.push(state.dead.stage);
    const key = names.join('\n');
    if (select.dataset.key !== key) {
      select.dataset.key = key;
      fill(select, names.length
        ? names.map((n) => el('option', { value: n }, n))
        : el('option', { value: '' }, 'no stages'));
    }
    if (!state.dead.stage && names.length) state.dead.stage = names[0];
    select.value = state.dead.stage;
  }

  async function loadDead() {
    const stage = state.dead.stage;
    if (!stage) { renderDead(); return; }
    state.dead.loading = true;
    state.dead.error = null;
    renderDead();
    try {
      const listing = await api(`/api/dead/${enc(stage)}?limit=100`);
      if (stage !== state.dead.stage) return;
      state.dead.listing = listing;
      const ids = new Set((listing.tasks || []).map((t) => t.id).filter(Boolean));
      for (const id of [...state.dead.selected]) if (!ids.has(id)) state.dead.selected.delete(id);
    } catch (e) {
      if (stage !== state.dead.stage) return;
      state.dead.listing = null;
      state.dead.error = e;
    } finally {
      if (stage === state.dead.stage) state.dead.loading = false;
    }
    invalidate('dead');
  }

  function updateDeadButtons() {
    const listing = state.dead.listing;
    $('#dead-replay-selected').disabled = state.dead.selected.size === 0;
    $('#dead-replay-all').disabled = !listing || !listing.count;
    const all = $('#dead-select-all');
    if (all && listing) {
      const selectable = (listing.tasks || []).filter((t) => t.id).length;
      all.checked = selectable > 0 && state.dead.selected.size === selectable;
      all.indeterminate = state.dead.selected.size > 0 && state.dead.selected.size < selectable;
    }
    const selected = state.dead.selected.size;
    setText($('#dead-replay-selected'), selected ? `Replay selected (${selected})` : 'Replay selected');
  }

  function renderDead() {
    state.dirty.delete('dead');
    fillDeadStages();
    const table = $('#dead-table');
    const summary = $('#dead-summary');
    const { listing, loading, error } = state.dead;
    if (loading) setText(summary, 'loading\u2026');
    if (error) {
      setText(summary, '');
      fill(table, el('tbody', null, el('tr', null, el('td', { class: 'error-box' }, error.message))));
      updateDeadButtons();
      return;
    }
    if (!listing) {
      if (!loading) setText(summary, state.dead.stage ? '' : 'no stage to look at');
      if (!loading) table.replaceChildren();
      updateDeadButtons();
      return;
    }
    const tasks = Array.isArray(listing.tasks) ? listing.tasks : [];
    if (!loading) {
      setText(summary, tasks.length < listing.count
        ? `${fmtInt(listing.count)} dead-lettered in ${listing.stage}, oldest ${tasks.length} shown`
        : `${fmtInt(listing.count)} dead-lettered in ${listing.stage}`);
    }
    if (!tasks.length) {
      fill(table, el('tbody', null, el('tr', null, el('td', { class: 'none' }, 'No dead letters.'))));
      updateDeadButtons();
      return;
    }
    const rows = tasks.map((t) => {
      const checked = Boolean(t.id) && state.dead.selected.has(t.id);
      return el('tr', { class: ['dead-row', checked && 'selected'], 'data-task-id': t.id || '' },
        el('td', null, el('input', { type: 'checkbox', class: 'dead-check', value: t.id || '', disabled: !t.id, checked, 'aria-label': `Select ${t.id || 'task'}` })),
        el('td', { class: 'mono' }, t.id ? taskLink(t.id) : el('span', { class: 'none' }, 'no id')),
        el('td', { class: 'mono' }, t.error_class || DASH),
        el('td', { class: 'err' }, workerText(t.error, t.redacted, DASH)),
        el('td', { class: 'num' }, t.attempt == null ? DASH : String(t.attempt)),
        el('td', { class: 'mono' }, t.dead_by || DASH),
        el('td', null, isNum(t.enqueued_at_ms) ? agoNode(t.enqueued_at_ms) : DASH),
        el('td', { class: 'num' }, fmtBytes(t.payload_bytes)),
        el('td', { class: 'preview', title: t.payload_preview || '' }, workerText(t.payload_preview, t.redacted)));
    });
    fill(table,
      el('thead', null, el('tr', null,
        el('th', null, el('input', { type: 'checkbox', id: 'dead-select-all', 'aria-label': 'Select all' })),
        ['Task', 'Error class', 'Error', 'Attempt', 'Dead-lettered by', 'Enqueued', 'Payload', 'Preview'].map((h) =>
          el('th', { class: h === 'Attempt' || h === 'Payload' ? 'num' : null }, h)))),
      el('tbody', null, rows));
    updateDeadButtons();
  }

  async function replayDead(body, button) {
    const stage = state.dead.stage;
    if (!stage) return;
    await busy(button, async () => {
      try {
        const answer = await api(`/api/dead/${enc(stage)}/replay`, { method: 'POST', body, interactive: true });
        const replayed = (answer && answer.replayed) || [];
        const notFound = (answer && answer.not_found) || [];
        const result = $('#dead-result');
        fill(result,
          el('div', { class: 'replayed' }, el('b', null, `Replayed ${replayed.length}`),
            replayed.length ? [': ', el('span', { class: 'id-list' }, replayed.join(', '))] : null),
          notFound.length
            ? el('div', { class: 'not-found' }, el('b', null, `Not found ${notFound.length}`), ': ',
              el('span', { class: 'id-list' }, notFound.join(', ')))
            : null);
        result.hidden = false;
        toast(`${stage}: replayed ${replayed.length}${notFound.length ? `, ${notFound.length} not found` : ''}`, notFound.length ? 'info' : 'ok');
        state.dead.selected.clear();
      } catch (e) {
        toastError(e, `${stage}: replay`);
      }
    });
    await loadDead();
  }

  function setupDeadView() {
    $('#dead-form').addEventListener('submit', (e) => {
      e.preventDefault();
      state.dead.stage = $('#dead-stage').value;
      loadDead();
    });
    $('#dead-stage').addEventListener('change', () => {
      const stage = $('#dead-stage').value;
      state.dead.stage = stage;
      state.dead.listing = null;
      state.dead.selected.clear();
      $('#dead-result').hidden = true;
      const hash = `#dead/${enc(stage)}`;
      if (location.hash !== hash) history.replaceState(null, '', hash);
      loadDead();
    });
    $('#dead-table').addEventListener('change', (e) => {
      const box = e.target;
      if (box.id === 'dead-select-all') {
        const tasks = (state.dead.listing && state.dead.listing.tasks) || [];
        state.dead.selected.clear();
        if (box.checked) for (const t of tasks) if (t.id) state.dead.selected.add(t.id);
        for (const check of document.querySelectorAll('#dead-table .dead-check')) {
          check.checked = box.checked && !check.disabled;
          check.closest('tr').classList.toggle('selected', check.checked);
        }
      } else if (box.classList.contains('dead-check')) {
        if (box.checked) state.dead.selected.add(box.value);
        else state.dead.selected.delete(box.value);
        box.closest('tr').classList.toggle('selected', box.checked);
      }
      updateDeadButtons();
    });
    $('#dead-replay-selected').addEventListener('click', (e) => {
      const ids = [...state.dead.selected];
      if (ids.length) replayDead({ ids }, e.currentTarget);
    });
    $('#dead-replay-all').addEventListener('click', (e) => replayDead({ all: true }, e.currentTarget));
  }

  // =====================================================================
  // Applying REST / SSE bodies
  // =====================================================================

  function applyStages(body) {
    if (!body || !Array.isArray(body.stages)) return;
    state.stages = body;
    reorderGroups();
    invalidate('pipeline');
    if (state.view === 'dead') {
      fillDeadStages();
      if (!state.dead.listing && !state.dead.loading && !state.dead.error && state.dead.stage) loadDead();
    } else {
      state.dirty.add('dead');
    }
    if (state.errors) invalidate('errors');
    if (state.view === 'task') refreshTaskList();
  }

  function applyScaling(body) {
    if (!body || !Array.isArray(body.stages)) return;
    state.scaling = body;
    invalidate('pipeline');
  }

  function applyErrors(body) {
    if (!body) return;
    state.errors = body;
    state.errorsMissing = false;
    invalidate('errors');
  }

  /** The server's clock from a REST workers list (no now_ms there). */
  function offsetFromWorkers(list) {
    for (const w of list) {
      if (isNum(w.last_seen_at_ms) && isNum(w.last_seen_ago_ms)) {
        clockOffset = w.last_seen_at_ms + w.last_seen_ago_ms - Date.now();
        return;
      }
    }
  }

  let loadErrorShown = false;

  /** Fetches the whole state over REST (at start and after a reconnect). */
  async function loadAll() {
    const [workers, stages, scaling, errors] = await Promise.allSettled([
      api('/api/workers'),
      api('/api/stages'),
      api('/api/scaling'),
      api('/api/errors', { allow404: true }),
    ]);
    if (workers.status === 'fulfilled' && workers.value && Array.isArray(workers.value.workers)) {
      offsetFromWorkers(workers.value.workers);
      applyWorkers(workers.value.workers, [], true);
    }
    if (stages.status === 'fulfilled') applyStages(stages.value);
    if (state.view === 'task') loadTaskList();
    if (scaling.status === 'fulfilled') applyScaling(scaling.value);
    if (errors.status === 'fulfilled') {
      if (errors.value == null) {
        state.errorsMissing = true;
        invalidate('errors');
      } else {
        applyErrors(errors.value);
      }
    }
    const failed = [workers, stages, scaling, errors].filter((r) => r.status === 'rejected');
    if (failed.length && !loadErrorShown) {
      loadErrorShown = true;
      toastError(failed[0].reason, 'Loading the state');
    } else if (!failed.length) {
      loadErrorShown = false;
    }
    loadHealth();
  }

  async function loadHealth() {
    let body = null;
    try {
      const res = await fetch('/healthz', { cache: 'no-store', headers: { Accept: 'application/json' } });
      body = await res.json();
    } catch (_) { /* shown by the live indicator */ }
    const ns = $('#namespace');
    const health = $('#health');
    if (body && typeof body === 'object') {
      setText(ns, body.namespace ? `${body.namespace}` : '');
      ns.title = `coordinator ${body.coordinator || '?'}, version ${body.version || '?'}`;
      if (body.status && body.status !== 'ok') {
        setText(health, body.status);
        health.hidden = false;
      } else {
        health.hidden = true;
      }
    }
  }

  // =====================================================================
  // Live updates (Server-Sent Events)
  // =====================================================================

  let source = null;
  let openedOnce = false;
  let retryTimer = null;
  let retryDelay = 1000;

  function setLive(live) {
    const node = $('#live');
    node.dataset.state = live ? 'live' : 'reconnecting';
    setText(node, live ? 'live' : openedOnce ? 'reconnecting\u2026' : 'connecting\u2026');
  }

  function parseEvent(e) {
    try { return JSON.parse(e.data); } catch (_) { return null; }
  }

  /** (Re)opens the event stream, with the token in the URL if there is one. */
  function connectEvents() {
    clearTimeout(retryTimer);
    if (source) source.close();
    if (typeof EventSource !== 'function') { setLive(false); return; }
    const url = token ? `/api/events?access_token=${enc(token)}` : '/api/events';
    const es = new EventSource(url);
    source = es;
    setLive(false);
    es.onopen = () => {
      if (source !== es) return;
      setLive(true);
      retryDelay = 1000;
      // A reopened stream may have missed updates: fetch everything again.
      if (openedOnce) loadAll();
      openedOnce = true;
    };
    es.onerror = () => {
      if (source !== es) return;
      setLive(false);
      // The browser retries by itself unless the server answered with an
      // error (401, 404...): then the stream is closed and we retry.
      if (es.readyState === EventSource.CLOSED) {
        clearTimeout(retryTimer);
        retryTimer = setTimeout(async () => {
          if (source !== es) return;
          try { await loadAll(); } catch (_) { /* reported by loadAll */ }
          if (source === es) connectEvents();
        }, retryDelay);
        retryDelay = Math.min(retryDelay * 2, 30000);
        openedOnce = true;
      }
    };
    es.addEventListener('workers', (e) => {
      const body = parseEvent(e);
      if (!body) return;
      if (isNum(body.now_ms)) clockOffset = body.now_ms - Date.now();
      applyWorkers(Array.isArray(body.workers) ? body.workers : [], Array.isArray(body.removed) ? body.removed : [], !!body.full);
    });
    es.addEventListener('stages', (e) => applyStages(parseEvent(e)));
    es.addEventListener('scaling', (e) => applyScaling(parseEvent(e)));
    es.addEventListener('errors', (e) => applyErrors(parseEvent(e)));
  }

  // =====================================================================
  // Start-up
  // =====================================================================

  function tick() {
    if (state.view === 'workers') {
      for (const group of groups.values()) {
        if (!group.body.hidden && !group.root.hidden) tickTimes(group.body);
      }
    } else {
      const view = $(`#view-${state.view}`);
      if (view) tickTimes(view);
    }
    if (!$('#logs-panel').hidden) tickTimes($('#logs-panel'));
  }

  function start() {
    setupTokenDialog();
    setupHiddenText();
    setupWorkersView();
    setupLogs();
    setupTaskView();
    setupBulkCancel();
    setupDeadView();
    window.addEventListener('hashchange', route);
    state.dirty.add('pipeline');
    state.dirty.add('errors');
    state.dirty.add('task');
    state.dirty.add('dead');
    route();
    setInterval(tick, 1000);
    loadAll().finally(connectEvents);
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
