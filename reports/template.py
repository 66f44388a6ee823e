"""The report page: inline CSS and JavaScript (no network), the data as embedded JSON.

The page sets ``data-ready="1"`` on ``<html>`` once its script has run (and ``data-ready-ms``: the
milliseconds from navigation start to then, the page's open time), collects script errors
in ``data-js-errors`` (and shows them in a red bar) and pictures that failed to load in
``data-broken-images``: the browser test reads all three.
"""

from __future__ import annotations

import html
import json
import re

CSS = r"""
:root { --fg:#1d2430; --muted:#5d6776; --line:#d9dee6; --bg:#f5f7fa; --card:#fff; --accent:#2459c4;
        --ok:#1f8a3b; --bad:#c0392b; --warn:#b7791f; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
       color:var(--fg); background:var(--bg); }
header { background:#1d2a44; color:#fff; padding:12px 20px; }
header h1 { margin:0; font-size:18px; font-weight:600; }
header .sub { color:#b9c4d8; font-size:12px; margin-top:2px; }
nav { display:flex; gap:4px; padding:0 20px; background:#26365a; }
nav button { background:none; border:0; color:#cdd6e6; padding:9px 14px; font-size:14px; cursor:pointer;
             border-bottom:3px solid transparent; }
nav button.active { color:#fff; border-bottom-color:#7fb0ff; }
main { padding:16px 20px 40px; }
section { display:none; } section.active { display:block; }
.cards { display:flex; flex-wrap:wrap; gap:14px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 14px; }
.card h2, .card h3 { margin:0 0 6px; font-size:16px; }
.muted { color:var(--muted); } .small { font-size:12px; }
table { border-collapse:collapse; }
table.kv td { padding:2px 10px 2px 0; vertical-align:top; }
table.kv td:first-child { white-space:nowrap; }
table.grid { width:100%; background:var(--card); border:1px solid var(--line); }
table.grid th, table.grid td { border-bottom:1px solid var(--line); padding:5px 8px; text-align:left; vertical-align:top; }
table.grid th { background:#eef2f8; position:sticky; top:0; font-weight:600; white-space:nowrap; }
table.grid th.sortable { cursor:pointer; user-select:none; }
table.grid th.sortable:hover { background:#dfe7f5; }
table.grid tbody tr:hover { background:#f0f5ff; cursor:pointer; }
td.num, th.num, table.grid td.num, table.grid th.num { text-align:right; font-variant-numeric:tabular-nums; }
.metrics td.num { min-width:90px; }
.ok { color:var(--ok); font-weight:600; } .bad { color:var(--bad); font-weight:600; } .unk { color:var(--muted); }
.err { color:var(--bad); }
.controls { display:flex; flex-wrap:wrap; gap:8px; align-items:center; margin-bottom:10px; }
.controls input[type=text] { padding:5px 8px; min-width:260px; border:1px solid var(--line); border-radius:5px; }
.controls select, .controls button { padding:4px 8px; border:1px solid var(--line); border-radius:5px; background:#fff; }
.pager { display:flex; gap:8px; align-items:center; margin:8px 0; }
.runs-grid { display:grid; gap:12px; grid-template-columns:repeat(auto-fit, minmax(260px, 1fr)); }
.viewctl label { margin-right:8px; white-space:nowrap; }
.runcol h3 { margin:0 0 4px; }
figure { margin:0 0 8px; } figure img { max-width:100%; border:1px solid var(--line); border-radius:4px; display:block; }
figcaption { font-size:12px; color:var(--muted); }
.views { display:grid; grid-template-columns:repeat(auto-fill,minmax(180px,1fr)); gap:8px; }
.plain { max-width:320px; }
ol.caps { margin:4px 0 0 18px; padding:0; font-size:12px; color:#333; }
.qgrid { overflow-x:auto; }
.qgrid table td, .qgrid table th { min-width:190px; }
.qgrid img { width:180px; border:1px solid var(--line); border-radius:4px; display:block; }
.plots img { max-width:100%; background:#fff; border:1px solid var(--line); border-radius:6px; }
.badge { display:inline-block; padding:0 6px; border-radius:9px; font-size:11px; background:#e7ecf5; color:#334; }
#js-errors { display:none; background:#fde2e1; color:#8a1c14; padding:8px 20px; white-space:pre-wrap; }
a { color:var(--accent); text-decoration:none; } a:hover { text-decoration:underline; }
.gt { font-size:12px; color:#333; }
.colorbar { display:flex; align-items:center; gap:4px; color:var(--muted); }
.colorbar span { white-space:nowrap; }
.colorbar img, .qgrid .colorbar img { flex:1 1 auto; width:auto; min-width:40px; height:10px; border:0; border-radius:2px; }
img.thumb { width:48px; height:48px; object-fit:cover; border-radius:3px; display:block; }
.nav2 { display:flex; gap:6px; align-items:center; margin-bottom:10px; flex-wrap:wrap; }
"""

ERROR_HOOK = r"""
(function () {
  var errors = [];
  function note(msg) {
    errors.push(msg);
    document.documentElement.setAttribute('data-js-errors', errors.join(' | '));
    var bar = document.getElementById('js-errors');
    if (bar) { bar.style.display = 'block'; bar.textContent = 'Report script error: ' + errors.join('\n'); }
  }
  window.addEventListener('error', function (e) {
    note((e.message || 'error') + (e.filename ? ' (' + e.filename + ':' + e.lineno + ')' : ''));
  });
  window.addEventListener('unhandledrejection', function (e) { note('unhandled rejection: ' + e.reason); });
})();
"""

SCRIPT = r"""
(function () {
  'use strict';
  var DATA = JSON.parse(document.getElementById('report-data').textContent);
  var RUNS = DATA.runs, SAMPLES = DATA.samples, NR = RUNS.length;
  var BY_ID = {}, IMAGES = {}, IMAGE_ORDER = [];
  SAMPLES.forEach(function (s, i) {
    BY_ID[s.id] = i;
    if (!(s.im in IMAGES)) { IMAGES[s.im] = []; IMAGE_ORDER.push(s.im); }
    IMAGES[s.im].push(i);
  });

  function h(tag, attrs) {
    var el = document.createElement(tag);
    if (attrs) for (var k in attrs) {
      if (!Object.prototype.hasOwnProperty.call(attrs, k) || attrs[k] === null || attrs[k] === undefined) continue;
      if (k === 'text') el.textContent = attrs[k];
      else if (k === 'cls') el.className = attrs[k];
      else if (k.slice(0, 2) === 'on') el.addEventListener(k.slice(2), attrs[k]);
      else el.setAttribute(k, attrs[k]);
    }
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined || c === false) continue;
      if (Array.isArray(c)) c.forEach(function (x) { if (x) el.appendChild(typeof x === 'string' ? document.createTextNode(x) : x); });
      else el.appendChild(typeof c === 'string' || typeof c === 'number' ? document.createTextNode(String(c)) : c);
    }
    return el;
  }
  function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); return el; }
  function fmt(v, d) { return (v === null || v === undefined) ? '-' : (typeof v === 'number' ? v.toFixed(d === undefined ? 3 : d) : String(v)); }
  function gtText(gt) { return gt ? gt.map(function (p) { return p[1] > 1 ? p[0] + ' \u00d7' + p[1] : p[0]; }).join(', ') : '-'; }
  function okBadge(e) {
    if (!e || e.ok === null || e.ok === undefined) return h('span', {cls: 'unk', text: '?'});
    return e.ok ? h('span', {cls: 'ok', text: '\u2713'}) : h('span', {cls: 'bad', text: '\u2717'});
  }
  function first(obj) { if (!obj) return null; for (var k in obj) return obj[k]; return null; }
  function sampleLink(id, text) { return h('a', {href: '#sample=' + encodeURIComponent(id), text: text || id}); }
  function imageLink(id, text) { return h('a', {href: '#image=' + encodeURIComponent(id), text: text || id}); }
  var broken = [];
  function onBroken(e) {
    var src = e.target.getAttribute('src');
    if (broken.indexOf(src) < 0) broken.push(src);
    document.documentElement.setAttribute('data-broken-images', broken.join(' '));
  }
  function img(src, alt, cls) { return src ? h('img', {src: src, alt: alt, loading: 'lazy', cls: cls || null, onerror: onBroken}) : null; }

  // ---- what the sample and image views show: heatmap scaling, runs ----
  // per map: each overlay spans its own [min, max]; shared: the same sample's heatmaps of one kind
  // span one range across the runs, so a weaker map looks weaker
  var VIEW = {scaling: 'own', shown: RUNS.map(function () { return true; })};
  var HAS_SHARED = SAMPLES.some(function (s) { return !!s.hs; });
  var OPACITY = DATA.colorbar.colormap + ' colour map; overlay opacity ' + Math.round(DATA.colorbar.opacity[0] * 100) +
    '% at the low end of the range (the whole picture is tinted, so a map whose heat sits in a few cells still shows) to ' +
    Math.round(DATA.colorbar.opacity[1] * 100) + '% at the high end';
  function pic(e, s, k) { return (VIEW.scaling === 'shared' && e.vs && e.vs[k]) || (e.v && e.v[k]) || null; }
  function heatLegend(e, s, k) {
    var shared = VIEW.scaling === 'shared' && s.hs && s.hs[k];
    var range = shared || (e.hr && e.hr[k]);
    if (!range) return null;
    return h('div', {cls: 'colorbar small', 'data-scale': shared ? 'shared' : 'own',
                     title: (shared ? 'range shared by this sample\'s ' + k + ' maps across the runs' : 'this map\'s own range') + '; ' + OPACITY},
      h('span', {text: range[0].toPrecision(3)}), img(DATA.colorbar.src, DATA.colorbar.colormap + ' colour bar'),
      h('span', {text: range[1].toPrecision(3)}));
  }
  function viewControls(where, rerender) {
    var box = h('div', {cls: 'nav2 viewctl small'});
    if (HAS_SHARED) {
      box.appendChild(h('span', {cls: 'muted', text: 'heatmap range: '}));
      [['own', 'per map'], ['shared', 'shared across runs']].forEach(function (o) {
        box.appendChild(h('label', null, h('input', {type: 'radio', name: 'scaling-' + where, value: o[0], 'data-scaling': o[0],
          checked: VIEW.scaling === o[0] ? 'checked' : null, onchange: function () { VIEW.scaling = o[0]; rerender(); }}), ' ' + o[1]));
      });
    }
    if (NR > 1) {
      box.appendChild(h('span', {cls: 'muted', text: 'runs shown: '}));
      RUNS.forEach(function (r, i) {
        box.appendChild(h('label', null, h('input', {type: 'checkbox', 'data-run': String(i), checked: VIEW.shown[i] ? 'checked' : null,
          onchange: function (ev) { VIEW.shown[i] = ev.target.checked; rerender(); }}), ' ' + r.label));
      });
    }
    box.appendChild(h('span', {cls: 'muted', text: OPACITY}));
    return box;
  }

  // ---- tabs and routing ----
  var TABS = ['summary', 'samples', 'sample', 'image', 'plots'];
  function show(tab) {
    TABS.forEach(function (t) {
      document.getElementById('tab-' + t).classList.toggle('active', t === tab);
      document.getElementById('btn-' + t).classList.toggle('active', t === tab);
    });
  }
  function fragment() {  // a mistyped or truncated link (#sample=pct%zz) opens the summary, not a script error
    try { return decodeURIComponent(location.hash.replace(/^#/, '')); } catch (e) { return ''; }
  }
  function route() {
    var hash = fragment();
    if (hash.indexOf('sample=') === 0) { renderSample(hash.slice(7)); show('sample'); }
    else if (hash.indexOf('image=') === 0) { renderImage(hash.slice(6)); show('image'); }
    else if (TABS.indexOf(hash) >= 0) {
      if (hash === 'sample') renderSample(current.sample);
      if (hash === 'image') renderImage(current.image);
      show(hash);
    } else show('summary');
  }
  var current = {sample: SAMPLES.length ? SAMPLES[0].id : null, image: IMAGE_ORDER.length ? IMAGE_ORDER[0] : null};
  TABS.forEach(function (t) {
    document.getElementById('btn-' + t).addEventListener('click', function () { location.hash = t; });
  });
  window.addEventListener('hashchange', route);

  // ---- summary ----
  function renderSummary() {
    var root = clear(document.getElementById('tab-summary'));
    var mt = h('table', {cls: 'grid metrics'},
      h('thead', null, h('tr', null, h('th', {text: 'metric'}), RUNS.map(function (r) { return h('th', {cls: 'num', text: r.label}); }))),
      h('tbody', null, DATA.metrics.map(function (m) {
        return h('tr', null, h('td', {text: m[0]}), m[1].map(function (v) {
          return h('td', {cls: 'num', text: (m[0] === 'samples' || m[0] === 'errors') ? fmt(v, 0) :
            fmt(v, m[0].indexOf('(%)') >= 0 ? 2 : 4)});
        }));
      })));
    root.appendChild(h('div', {cls: 'card', style: 'margin-bottom:14px; overflow-x:auto'},
      h('h2', {text: 'Runs compared'}), mt,
      NR > 1 ? h('p', {cls: 'muted small', text: 'Answers differ on ' + DATA.differ + ' of ' + DATA.shared +
        ' samples present in every run (filter "answers differ" in Samples).'}) : null));
    (DATA.accuracy_tables || []).forEach(function (t) {  // the same cells as runtime compare prints
      root.appendChild(h('div', {cls: 'card', style: 'margin-bottom:14px; overflow-x:auto'},
        h('h2', {text: t.title}), t.notes.map(function (n) { return h('p', {cls: 'muted small', text: n}); }),
        h('table', {cls: 'grid small accuracy'},
          h('thead', null, h('tr', null, t.head.map(function (c, i) { return h('th', {cls: t.align[i] === 'r' ? 'num' : null, text: c}); }))),
          h('tbody', null, t.rows.map(function (row) {
            return h('tr', null, row.map(function (c, i) { return h('td', {cls: t.align[i] === 'r' ? 'num' : null, text: c}); }));
          })))));
    });
    var cards = h('div', {cls: 'cards'});
    RUNS.forEach(function (r) {
      var kv = h('table', {cls: 'kv'});
      function row(k, v) { kv.appendChild(h('tr', null, h('td', {cls: 'muted', text: k}), h('td', null, v))); }
      row('graph', r.graph + (r.graph_file ? ' (' + r.graph_file + ')' : ''));
      if (r.description) row('about', r.description);
      row('run folder', r.dir);
      row('dataset', r.dataset);
      row('samples', String(r.samples));
      row('errors', h('span', {cls: r.errors ? 'err' : null, text: String(r.errors)}));
      r.metrics.forEach(function (m) { if (m[0] !== 'samples' && m[0] !== 'errors' && m[1] !== null) row(m[0], fmt(m[1], 4)); });
      (r.evaluation || []).forEach(function (e) { row(e[0], e[1]); });
      if (r.answers.length) row('answers', h('span', {cls: 'answers', text: r.distinct_answers + ' distinct; most frequent: ' +
        r.answers.slice(0, 5).map(function (c) { return c[0] + ' \u00d7' + c[1]; }).join(', ')}));
      (r.warnings || []).forEach(function (w) { row('warning', h('span', {cls: 'err', text: w})); });
      row('status', (r.status || '?') + ', ' + (r.executor || '?') + ' on ' + (r.device || '?') + ', ' + fmt(r.seconds, 1) + ' s');
      row('started', (r.started || '-') + ' \u2192 ' + (r.finished || '-'));
      if (r.reruns.length) row('reruns', r.reruns.length + ' computing nothing (last ' + r.reruns[r.reruns.length - 1].started + '); times are of the run that did the work');
      var nodes = h('table', {cls: 'grid small'},
        h('thead', null, h('tr', null, ['node', 'stage', 'rows', 'run', 'cached', 'errors', 'time s', 'RSS MB'].map(function (t, i) {
          return h('th', {cls: i > 1 ? 'num' : null, text: t});
        }))),
        h('tbody', null, r.nodes.map(function (n) {
          return h('tr', null, n.map(function (v, i) {
            return h('td', {cls: i > 1 ? 'num' : null, text: i === 6 ? fmt(v, 2) : (i > 1 ? fmt(v, 0) : fmt(v))});
          }));
        })));
      cards.appendChild(h('div', {cls: 'card', style: 'flex:1 1 460px; min-width:0'},
        h('h2', {text: r.label}), kv,
        r.render_note ? h('p', {cls: 'small muted', text: r.render_note}) : null,
        r.error_examples.length ? h('div', {cls: 'small err'}, h('b', {text: 'errors: '}),
          h('ul', null, r.error_examples.map(function (e) { return h('li', {text: e}); }))) : null,
        h('h3', {text: 'Time per stage', style: 'margin-top:8px'}), h('div', {style: 'overflow-x:auto'}, nodes)));
    });
    root.appendChild(cards);
    if (DATA.plots.length) {
      root.appendChild(h('div', {cls: 'card plots', style: 'margin-top:14px'}, h('h2', {text: 'Plots'}),
        h('div', {cls: 'cards'}, DATA.plots.map(function (p) {
          return h('figure', {style: 'flex:1 1 420px; max-width:640px'}, h('img', {src: p.src, alt: p.title, loading: 'lazy', onerror: onBroken}), h('figcaption', {text: p.title}));
        }))));
    }
  }

  // ---- samples table ----
  var ROWS = [];
  SAMPLES.forEach(function (s, si) { s.r.forEach(function (e, ri) { if (e) ROWS.push({s: si, r: ri}); }); });
  var COLS = [
    {k: 'run', t: 'run', get: function (x) { return RUNS[x.r].label; }},
    {k: 'id', t: 'sample', get: function (x) { return SAMPLES[x.s].id; }},
    {k: 'q', t: 'question', get: function (x) { return SAMPLES[x.s].q || ''; }},
    {k: 'a', t: 'answer', get: function (x) { return SAMPLES[x.s].r[x.r].a || ''; }},
    {k: 'gt', t: 'ground truth', get: function (x) { var g = SAMPLES[x.s].gt; return g && g.length ? g[0][0] : ''; }},
    {k: 'ok', t: 'correct', num: true, get: function (x) { var v = SAMPLES[x.s].r[x.r].ok; return v === null || v === undefined ? -1 : v; }},
    {k: 'acc', t: 'acc.', num: true, get: function (x) { return SAMPLES[x.s].r[x.r].acc; }},
    {k: 'itm', t: 'ITM', num: true, get: function (x) { return SAMPLES[x.s].r[x.r].itm; }},
    {k: 'pg', t: 'pointing', num: true, get: function (x) { return first(SAMPLES[x.s].r[x.r].pg); }},
    {k: 'en', t: 'entropy', num: true, get: function (x) { return first(SAMPLES[x.s].r[x.r].en); }},
    {k: 'qt', t: 'type', get: function (x) { return SAMPLES[x.s].qt || ''; }},
    {k: 'st', t: 'status', get: function (x) { return SAMPLES[x.s].r[x.r].st || ''; }}
  ];
  var state = {text: '', qt: '', correct: '', run: '', status: '', differ: false, sort: null, desc: false,
               page: 0, size: DATA.page_size};
  var filtered = ROWS.slice();

  function buildControls() {
    var types = {}; SAMPLES.forEach(function (s) { if (s.qt) types[s.qt] = 1; });
    function sel(key, options) {
      return h('select', {'data-filter': key, onchange: function (e) { state[key] = e.target.value; state.page = 0; applyFilters(); }},
        options.map(function (o) { return h('option', {value: o[0], text: o[1]}); }));
    }
    var timer = null;
    var box = document.getElementById('controls');
    clear(box);
    box.appendChild(h('input', {type: 'text', id: 'filter-text', placeholder: 'filter: question, answer, ground truth, sample id',
      oninput: function (e) { clearTimeout(timer); var v = e.target.value; timer = setTimeout(function () { state.text = v.toLowerCase(); state.page = 0; applyFilters(); }, 150); }}));
    box.appendChild(sel('qt', [['', 'all question types']].concat(Object.keys(types).sort().map(function (t) { return [t, t]; }))));
    box.appendChild(sel('correct', [['', 'correct or not'], ['1', 'correct'], ['0', 'incorrect'], ['-1', 'no ground truth']]));
    box.appendChild(sel('run', [['', 'all runs']].concat(RUNS.map(function (r, i) { return [String(i), r.label]; }))));
    box.appendChild(sel('status', [['', 'any status'], ['ok', 'ok'], ['error', 'error']]));
    if (NR > 1) box.appendChild(h('label', null, h('input', {type: 'checkbox', onchange: function (e) { state.differ = e.target.checked; state.page = 0; applyFilters(); }}), ' answers differ'));
    box.appendChild(h('label', null, ' rows per page ', h('select', {onchange: function (e) { state.size = +e.target.value; state.page = 0; renderPage(); }},
      [25, 50, 100, 250].concat([DATA.page_size]).filter(function (v, i, a) { return a.indexOf(v) === i; }).sort(function (a, b) { return a - b; })
        .map(function (n) { var o = h('option', {value: n, text: n}); if (n === DATA.page_size) o.selected = true; return o; }))));
    var head = document.getElementById('samples-head');
    clear(head).appendChild(h('tr', null, COLS.map(function (c) {
      return h('th', {cls: 'sortable' + (c.num ? ' num' : ''), 'data-key': c.k, title: 'sort by ' + c.t,
        onclick: function () { if (state.sort === c.k) state.desc = !state.desc; else { state.sort = c.k; state.desc = !!c.num; } applyFilters(); }}, c.t);
    }), h('th', {text: 'heatmap'})));
  }

  function applyFilters() {
    var t = state.text;
    filtered = ROWS.filter(function (x) {
      var s = SAMPLES[x.s], e = s.r[x.r];
      if (state.run !== '' && String(x.r) !== state.run) return false;
      if (state.qt && s.qt !== state.qt) return false;
      if (state.status && e.st !== state.status) return false;
      if (state.differ && !s.x) return false;
      if (state.correct !== '') {
        var ok = (e.ok === null || e.ok === undefined) ? '-1' : String(e.ok);
        if (ok !== state.correct) return false;
      }
      if (t) {
        var hay = (s.id + '\n' + (s.q || '') + '\n' + (e.a || '') + '\n' + gtText(s.gt)).toLowerCase();
        if (hay.indexOf(t) < 0) return false;
      }
      return true;
    });
    if (state.sort) {
      var col = COLS.filter(function (c) { return c.k === state.sort; })[0], sign = state.desc ? -1 : 1;
      filtered = filtered.map(function (x, i) { return {x: x, v: col.get(x), i: i}; });
      filtered.sort(function (a, b) {
        var va = a.v, vb = b.v;
        if (va === null || va === undefined) va = col.num ? -Infinity : '';
        if (vb === null || vb === undefined) vb = col.num ? -Infinity : '';
        var c = col.num ? (va - vb) : String(va).localeCompare(String(vb));
        return c ? sign * c : a.i - b.i;
      });
      filtered = filtered.map(function (o) { return o.x; });
    }
    document.querySelectorAll('#samples-head th').forEach(function (th) {
      var k = th.getAttribute('data-key'), c = COLS.filter(function (c) { return c.k === k; })[0];
      if (!c) return;  // the thumbnail column does not sort
      th.textContent = c.t + (state.sort === k ? (state.desc ? ' \u25bc' : ' \u25b2') : '');
    });
    renderPage();
  }

  function renderPage() {
    var pages = Math.max(1, Math.ceil(filtered.length / state.size));
    state.page = Math.min(Math.max(0, state.page), pages - 1);
    var body = clear(document.getElementById('samples-body'));
    var start = state.page * state.size, rows = filtered.slice(start, start + state.size);
    var frag = document.createDocumentFragment();
    rows.forEach(function (x) {
      var s = SAMPLES[x.s], e = s.r[x.r];
      frag.appendChild(h('tr', {'data-sample': s.id, onclick: function () { location.hash = 'sample=' + encodeURIComponent(s.id); }},
        h('td', {text: RUNS[x.r].label}),
        h('td', null, sampleLink(s.id)),
        h('td', {text: s.q || ''}),
        h('td', {text: e.a === null || e.a === undefined ? '-' : e.a, cls: e.st === 'error' ? 'err' : null, title: e.err || null}),
        h('td', {cls: 'gt', text: gtText(s.gt)}),
        h('td', {cls: 'num'}, okBadge(e)),
        h('td', {cls: 'num', text: fmt(e.acc, 2)}),
        h('td', {cls: 'num', text: fmt(e.itm, 3)}),
        h('td', {cls: 'num', text: fmt(first(e.pg), 0)}),
        h('td', {cls: 'num', text: fmt(first(e.en), 3)}),
        h('td', {text: s.qt || '-'}),
        h('td', {text: e.st || '-', cls: e.st === 'error' ? 'err' : null}),
        h('td', null, e.v && e.v.heatmap ? img(e.v.heatmap, 'heatmap ' + s.id, 'thumb') : null)));
    });
    body.appendChild(frag);
    document.getElementById('samples-table').setAttribute('data-rows', String(filtered.length));
    var info = filtered.length ? ('rows ' + (start + 1) + '\u2013' + (start + rows.length) + ' of ' + filtered.length) : 'no rows match';
    [document.getElementById('pager-top'), document.getElementById('pager-bottom')].forEach(function (p) {
      clear(p).appendChild(h('button', {onclick: function () { state.page = 0; renderPage(); }, disabled: state.page === 0 ? 'disabled' : null, text: '\u00ab'}));
      p.appendChild(h('button', {onclick: function () { state.page--; renderPage(); }, disabled: state.page === 0 ? 'disabled' : null, text: '\u2039 prev'}));
      p.appendChild(h('span', {text: 'page ' + (state.page + 1) + ' of ' + pages + ' \u00b7 ' + info}));
      p.appendChild(h('button', {onclick: function () { state.page++; renderPage(); }, disabled: state.page >= pages - 1 ? 'disabled' : null, text: 'next \u203a'}));
      p.appendChild(h('button', {onclick: function () { state.page = pages - 1; renderPage(); }, disabled: state.page >= pages - 1 ? 'disabled' : null, text: '\u00bb'}));
    });
  }

  // ---- one sample, every run side by side ----
  function metricLine(label, obj, d) {
    if (!obj) return null;
    var parts = []; for (var k in obj) parts.push((Object.keys(obj).length > 1 ? k + ' ' : '') + fmt(obj[k], d));
    return h('div', {cls: 'small'}, h('span', {cls: 'muted', text: label + ': '}), parts.join(' \u00b7 '));
  }
  function goBox(kind, value, go) {
    var input = h('input', {type: 'text', value: value || '', size: 32, placeholder: kind + ' id'});
    return h('span', null, input, ' ', h('button', {text: 'go', onclick: function () { go(input.value.trim()); }}));
  }
  function renderSample(id) {
    var root = clear(document.getElementById('tab-sample'));
    if (id === null || id === undefined || !(id in BY_ID)) {
      root.appendChild(h('p', {text: SAMPLES.length ? ('no sample "' + id + '" in this report') : 'no samples'}));
      if (!SAMPLES.length) return;
      id = SAMPLES[0].id;
    }
    current.sample = id;
    var i = BY_ID[id], s = SAMPLES[i];
    current.image = s.im;
    var prev = i > 0 ? SAMPLES[i - 1].id : null, next = i < SAMPLES.length - 1 ? SAMPLES[i + 1].id : null;
    root.appendChild(h('div', {cls: 'nav2'},
      h('button', {text: '\u2039 previous', disabled: prev === null ? 'disabled' : null, onclick: function () { location.hash = 'sample=' + encodeURIComponent(prev); }}),
      h('button', {text: 'next \u203a', disabled: next === null ? 'disabled' : null, onclick: function () { location.hash = 'sample=' + encodeURIComponent(next); }}),
      h('span', {cls: 'muted', text: 'sample ' + (i + 1) + ' of ' + SAMPLES.length}),
      goBox('sample', id, function (v) { location.hash = 'sample=' + encodeURIComponent(v); })));
    root.appendChild(h('div', {cls: 'card', style: 'margin-bottom:12px; display:flex; gap:16px; flex-wrap:wrap'},
      s.img ? h('figure', {cls: 'plain'}, img(s.img, 'image ' + s.im), h('figcaption', {text: 'image'})) : null,
      h('div', null,
        h('h2', {text: s.q || '(no question)'}),
        h('div', null, h('span', {cls: 'muted', text: 'sample '}), s.id, '  ', h('span', {cls: 'badge', text: s.qt || 'no type'})),
        h('div', null, h('span', {cls: 'muted', text: 'image '}), imageLink(s.im), h('span', {cls: 'muted small', text: ' (all its questions)'})),
        h('div', {cls: 'gt'}, h('span', {cls: 'muted', text: 'ground truth: '}), gtText(s.gt)),
        s.d ? null : h('p', {cls: 'small muted', text: 'Pictures and captions are included for the first ' + DATA.limit +
          ' samples only (runtime report --limit N); this one shows text and metrics.'}))));
    root.appendChild(viewControls('sample', function () { renderSample(id); }));
    var grid = h('div', {cls: 'runs-grid'});  // as many runs per row as fit, the others wrap
    RUNS.forEach(function (r, ri) {
      if (!VIEW.shown[ri]) return;
      var e = s.r[ri];
      var col = h('div', {cls: 'card runcol'}, h('h3', {text: r.label}));
      if (!e) { col.appendChild(h('p', {cls: 'muted', text: 'not in this run'})); grid.appendChild(col); return; }
      col.appendChild(h('div', {style: 'font-size:16px; margin-bottom:4px'}, okBadge(e), ' ', h('b', {text: e.a === null || e.a === undefined ? '(no answer)' : e.a})));
      col.appendChild(h('div', {cls: 'small'}, h('span', {cls: 'muted', text: 'accuracy '}), fmt(e.acc, 2), h('span', {cls: 'muted', text: ' \u00b7 ITM '}), fmt(e.itm, 3),
        e.es ? h('span', {cls: 'muted', text: ' \u00b7 ' + e.es}) : null));
      [metricLine('pointing game', e.pg, 0), metricLine('energy in mask', e.em, 3), metricLine('entropy', e.en, 3)]
        .forEach(function (line) { if (line) col.appendChild(line); });  // runs without ground truth have none
      if (e.err) col.appendChild(h('div', {cls: 'small err', text: e.err}));
      if (e.v) {
        var views = h('div', {cls: 'views'});
        Object.keys(DATA.views).forEach(function (k) {
          if (e.v[k]) views.appendChild(h('figure', null, img(pic(e, s, k), DATA.views[k] + ' (' + r.label + ')'), h('figcaption', {text: DATA.views[k]}),
            heatLegend(e, s, k)));
        });
        col.appendChild(views);
      }
      if (e.caps) {
        col.appendChild(h('div', {cls: 'small muted', style: 'margin-top:6px', text: 'captions (' + (e.ncaps > e.caps.length ? e.caps.length + ' of ' + e.ncaps : e.caps.length) + ')'}));
        col.appendChild(h('ol', {cls: 'caps'}, e.caps.map(function (c) { return h('li', {text: c}); })));
      }
      grid.appendChild(col);
    });
    root.appendChild(grid);
  }

  // ---- one image, all its questions ----
  function others(run) { return run.heatmaps.filter(function (k) { return k !== 'heatmap'; }); }

  function renderImage(id) {
    var root = clear(document.getElementById('tab-image'));
    if (id === null || id === undefined || !(id in IMAGES)) {
      root.appendChild(h('p', {text: IMAGE_ORDER.length ? ('no image "' + id + '" in this report') : 'no images'}));
      if (!IMAGE_ORDER.length) return;
      id = IMAGE_ORDER[0];
    }
    current.image = id;
    var k = IMAGE_ORDER.indexOf(id), idx = IMAGES[id];
    var prev = k > 0 ? IMAGE_ORDER[k - 1] : null, next = k < IMAGE_ORDER.length - 1 ? IMAGE_ORDER[k + 1] : null;
    root.appendChild(h('div', {cls: 'nav2'},
      h('button', {text: '\u2039 previous image', disabled: prev === null ? 'disabled' : null, onclick: function () { location.hash = 'image=' + encodeURIComponent(prev); }}),
      h('button', {text: 'next image \u203a', disabled: next === null ? 'disabled' : null, onclick: function () { location.hash = 'image=' + encodeURIComponent(next); }}),
      h('span', {cls: 'muted', text: 'image ' + (k + 1) + ' of ' + IMAGE_ORDER.length + ' \u00b7 ' + idx.length + ' questions'}),
      goBox('image', id, function (v) { location.hash = 'image=' + encodeURIComponent(v); })));
    var s0 = SAMPLES[idx[0]];
    var further = [];  // the runs' other heatmaps (enhanced, plugins'), each a row of its own
    RUNS.forEach(function (r) { others(r).forEach(function (k) { if (further.indexOf(k) < 0) further.push(k); }); });
    root.appendChild(h('div', {cls: 'card', style: 'margin-bottom:12px; display:flex; gap:16px'},
      s0.img ? h('figure', {cls: 'plain'}, img(s0.img, 'image ' + id)) : null,
      h('div', null, h('h2', {text: 'image ' + id}),
        h('p', {cls: 'muted', text: 'How the heatmap moves with the question: one column per question, one row per run' +
          (further.length ? ' (and per ' + further.map(function (k) { return DATA.views[k]; }).join(', ') + ')' : '') + '.'}),
        s0.d ? null : h('p', {cls: 'small muted', text: 'No pictures: beyond the first ' + DATA.limit + ' samples.'}))));
    root.appendChild(viewControls('image', function () { renderImage(id); }));
    var table = h('table', {cls: 'grid'});
    table.appendChild(h('thead', null, h('tr', null, h('th', {text: 'run'}), idx.map(function (i) {
      var s = SAMPLES[i];
      return h('th', null, sampleLink(s.id, s.q || s.id), h('div', {cls: 'gt', text: 'gt: ' + gtText(s.gt)}));
    }))));
    var body = h('tbody');
    RUNS.forEach(function (r, ri) {
      if (!VIEW.shown[ri]) return;
      var kinds = ['heatmap'].concat(others(r));
      kinds.forEach(function (kind) {
        body.appendChild(h('tr', null, h('td', null, h('b', {text: r.label}), kind !== 'heatmap' ? h('div', {cls: 'small muted', text: DATA.views[kind]}) : null),
          idx.map(function (i) {
            var e = SAMPLES[i].r[ri];
            if (!e) return h('td', {cls: 'muted', text: 'not in this run'});
            return h('td', null, img(pic(e, SAMPLES[i], kind), kind + ' ' + SAMPLES[i].id), heatLegend(e, SAMPLES[i], kind),
              kind === 'heatmap' ? h('div', null, okBadge(e), ' ', e.a === null || e.a === undefined ? '-' : e.a) : null,
              metricLine('entropy', e.en && e.en[kind] !== undefined ? {x: e.en[kind]} : null, 3));
          })));
      });
    });
    table.appendChild(body);
    root.appendChild(h('div', {cls: 'qgrid'}, table));
  }

  // ---- plots ----
  function renderPlots() {
    var root = clear(document.getElementById('tab-plots'));
    if (!DATA.plots.length) root.appendChild(h('p', {cls: 'muted', text: 'no plots (the runs keep no accuracy, heatmap or pointing-game columns)'}));
    DATA.plots.forEach(function (p) {
      root.appendChild(h('div', {cls: 'card plots', style: 'margin-bottom:14px'}, h('h2', {text: p.title}), h('img', {src: p.src, alt: p.title, loading: 'lazy', onerror: onBroken})));
    });
  }

  renderSummary();
  buildControls();
  applyFilters();
  renderPlots();
  route();
  document.documentElement.setAttribute('data-ready-ms', String(Math.round(performance.now())));
  document.documentElement.setAttribute('data-ready', '1');
})();
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>__CSS__</style>
<script>__ERROR_HOOK__</script>
</head>
<body>
<div id="js-errors"></div>
<header><h1>__TITLE__</h1><div class="sub">__SUBTITLE__</div></header>
<nav>
<button id="btn-summary" class="active">Summary</button>
<button id="btn-samples">Samples</button>
<button id="btn-sample">Sample</button>
<button id="btn-image">Image</button>
<button id="btn-plots">Plots</button>
</nav>
<main>
<section id="tab-summary" class="active"></section>
<section id="tab-samples">
<div class="controls" id="controls"></div>
<div class="pager" id="pager-top"></div>
<table class="grid" id="samples-table"><thead id="samples-head"></thead><tbody id="samples-body"></tbody></table>
<div class="pager" id="pager-bottom"></div>
</section>
<section id="tab-sample"></section>
<section id="tab-image"></section>
<section id="tab-plots"></section>
</main>
<script id="report-data" type="application/json">__DATA__</script>
<script>__SCRIPT__</script>
</body>
</html>
"""


def _json_for_script(data) -> str:
    """JSON safe inside a <script> element: no '<', '>', '&' or line separators unescaped."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def render_html(data: dict) -> str:
    runs = data["runs"]
    subtitle = (f"{len(data['samples'])} samples in {len(runs)} run{'s' if len(runs) != 1 else ''} · "
                f"pictures for the first {data['detail_samples']} · generated {data['generated']}")
    parts = {
        "__TITLE__": html.escape(data["title"]),
        "__SUBTITLE__": html.escape(subtitle),
        "__CSS__": CSS,
        "__ERROR_HOOK__": ERROR_HOOK,
        "__SCRIPT__": SCRIPT,
        "__DATA__": _json_for_script(data),
    }
    return re.sub("|".join(parts), lambda m: parts[m.group(0)], PAGE)
