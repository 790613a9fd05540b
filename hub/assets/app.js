// EMS dashboard page: hand-written, no dependencies, no build step.
// Tokens travel only in the Authorization header (fetch) and in the
// WebSocket subprotocol list (ems.v1, ems.bearer.<token>) — never in a URL.
// All data reaches the DOM through textContent, never innerHTML.
'use strict';

(function () {
  var HOUR = 3600 * 1000;
  var STALE_MS = 30 * 1000;
  // A device that announced an ack window has its newest readings held by
  // the hub for up to --batch-linger-ms (10 s at most) before their ack:
  // an oldest unacked reading younger than this is not a backlog.
  var HELD_MS = 15 * 1000;
  var VIEWER_KEY = 'ems.viewer';
  var ADMIN_KEY = 'ems.admin';

  function $(id) { return document.getElementById(id); }
  function show(el, on) { el.classList.toggle('hidden', !on); }
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    if (cls) { e.className = cls; }
    return e;
  }
  function fmtTime(ms) {
    if (ms === null || ms === undefined) { return 'never'; }
    var d = new Date(ms);
    var today = new Date();
    if (d.toDateString() === today.toDateString()) { return d.toLocaleTimeString(); }
    return d.toLocaleString();
  }
  function fmtDuration(ms) {
    var s = Math.round(ms / 1000);
    if (s < 120) { return s + ' s'; }
    if (s < 7200) { return Math.round(s / 60) + ' min'; }
    return (s / 3600).toFixed(1) + ' h';
  }
  function fmtNum(x, digits, unit) {
    if (x === null || x === undefined || !isFinite(x)) { return '–'; }
    return x.toFixed(digits) + ' ' + unit;
  }
  function wsBase() {
    return (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host;
  }
  function api(path, token, opts) {
    opts = opts || {};
    var headers = { 'Authorization': 'Bearer ' + token };
    if (opts.body !== undefined) { headers['Content-Type'] = 'application/json'; }
    return fetch(path, {
      method: opts.method || 'GET',
      headers: headers,
      body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
      cache: 'no-store',
      credentials: 'omit',
      referrerPolicy: 'no-referrer'
    }).then(function (r) {
      return r.text().then(function (t) {
        var body = null;
        try { body = t ? JSON.parse(t) : null; } catch (e) { body = null; }
        if (!r.ok) {
          var err = new Error((body && body.error) || ('HTTP ' + r.status));
          err.status = r.status;
          throw err;
        }
        return body;
      });
    });
  }

  // ---------------------------------------------------------------- tabs
  var currentTab = 'live';
  function selectTab(name) {
    currentTab = name;
    ['live', 'fleet', 'admin'].forEach(function (t) {
      $('tab-' + t).classList.toggle('active', name === t);
      show($('view-' + t), name === t);
    });
    // The viewer token form serves the live and the fleet view.
    show($('login'), name !== 'admin' && !viewerToken());
    if (name === 'admin') { admin.start(); } else { admin.stop(); }
    if (name === 'fleet') { fleet.start(); } else { fleet.stop(); }
    if (name === 'live' && live.token) { loadDevices(); }
    // The view is part of the address (#fleet opens the overview); the
    // token never is.
    if (window.history && history.replaceState && location.hash !== '#' + name) {
      history.replaceState(null, '', name === 'live' ? location.pathname : '#' + name);
    }
  }

  // ---------------------------------------------------------------- live
  var live = {
    token: null,
    devices: {},      // id -> state from /api/devices (+ status frames)
    selected: null,
    ws: null,
    retry: 0,
    retryTimer: null,
    points: [],       // {key, ts, p, v, i, e}
    keys: {},
    latest: null,
    lastRxMs: 0,
    dayStartEnergy: null,
    listTimer: null,
    tickTimer: null,
    fillTimer: null,
    fillRange: null
  };

  function viewerToken() { return localStorage.getItem(VIEWER_KEY); }

  function showLogin(msg) {
    show($('login'), currentTab !== 'admin');
    show($('live'), false);
    show($('fleet'), false);
    fleet.stop();
    setError(msg || null);
    fleet.error(msg || null);
  }

  function setError(msg) {
    $('error').textContent = msg || '';
    show($('error'), !!msg);
  }

  function startLive() {
    live.token = viewerToken();
    if (!live.token) { showLogin(); return; }
    show($('login'), false);
    show($('live'), true);
    loadDevices();
    clearInterval(live.listTimer);
    live.listTimer = setInterval(loadDevices, 10000);
    clearInterval(live.tickTimer);
    live.tickTimer = setInterval(renderDetail, 1000);
  }

  function loadDevices() {
    // The fleet view polls the list itself; this one serves the live view.
    if (currentTab !== 'live') { return; }
    api('/api/devices', live.token).then(function (body) {
      setError(null);
      var seen = {};
      body.devices.forEach(function (d) {
        seen[d.device_id] = true;
        var cur = live.devices[d.device_id];
        // The socket's status frames are fresher for the selected device;
        // the quarantine count comes only from here.
        if (!(cur && d.device_id === live.selected && live.ws)) { live.devices[d.device_id] = d; }
        else { cur.quarantined = d.quarantined; }
      });
      Object.keys(live.devices).forEach(function (id) { if (!seen[id]) { delete live.devices[id]; } });
      renderDevices();
      if (!live.selected && body.devices.length === 1) { selectDevice(body.devices[0].device_id); }
    }).catch(function (e) {
      if (e.status === 401 || e.status === 403) {
        localStorage.removeItem(VIEWER_KEY);
        stopLive();
        showLogin('That viewer token was not accepted (revoked or mistyped).');
      } else {
        setError('Cannot reach the hub: ' + e.message);
      }
    });
  }

  function stateOf(d) {
    if (!d) { return 'unknown'; }
    if (!d.online) { return 'offline'; }
    if (d.device_id === live.selected && live.lastRxMs && Date.now() - live.lastRxMs > STALE_MS) { return 'stale'; }
    return 'online';
  }

  function renderDevices() {
    var ul = $('devices');
    ul.textContent = '';
    var ids = Object.keys(live.devices).sort();
    if (ids.length === 0) { ul.appendChild(el('li', 'No devices in this token\u2019s scope yet.', 'muted')); }
    ids.forEach(function (id) {
      var d = live.devices[id];
      var li = el('li');
      li.dataset.device = id;
      if (id === live.selected) { li.classList.add('selected'); }
      var st = stateOf(d);
      var name = el('span', null, 'name');
      name.appendChild(el('span', null, 'dot ' + st));
      name.appendChild(document.createTextNode(id));
      li.appendChild(name);
      li.appendChild(el('span', st === 'offline' ? 'offline since ' + fmtTime(d.last_seen_ms) : st, 'muted'));
      if (d.quarantined) { li.appendChild(el('span', ' \u00b7 ' + d.quarantined + ' quarantined', 'muted quarantined')); }
      li.addEventListener('click', function () { selectDevice(id); });
      ul.appendChild(li);
    });
  }

  function resetSeries() {
    live.points = [];
    live.keys = {};
    live.latest = null;
    live.lastRxMs = 0;
    live.dayStartEnergy = null;
  }

  function selectDevice(id) {
    if (live.selected === id && live.ws) { return; }
    closeSocket();
    resetSeries();
    live.selected = id;
    live.retry = 0;
    show($('detail'), true);
    $('dev-name').textContent = id;
    renderDevices();
    loadDayStart(id);
    openSocket();
    startEnergy(id);
    renderDetail();
  }

  function loadDayStart(id) {
    var midnight = new Date();
    midnight.setHours(0, 0, 0, 0);
    var q = '?from_ms=' + midnight.getTime() + '&limit=1';
    api('/api/devices/' + encodeURIComponent(id) + '/readings' + q, live.token).then(function (body) {
      if (live.selected !== id) { return; }
      var r = body.readings[0];
      if (r && typeof r.energy_wh === 'number') { live.dayStartEnergy = r.energy_wh; }
      renderDetail();
    }).catch(function () { /* energy today stays unknown */ });
  }

  function closeSocket() {
    clearTimeout(live.retryTimer);
    if (live.ws) {
      var ws = live.ws;
      live.ws = null;
      ws.onclose = null;
      ws.close(1000);
    }
  }

  function openSocket() {
    var id = live.selected;
    if (!id || !live.token) { return; }
    // Resume: everything since the newest point we hold (duplicates at
    // that instant are dropped by key), else the last hour.
    var since = live.points.length ? live.points[live.points.length - 1].ts : Date.now() - HOUR;
    var ws;
    try {
      ws = new WebSocket(wsBase() + '/ws/dashboard/' + encodeURIComponent(id),
        ['ems.v1', 'ems.bearer.' + live.token, 'ems.resume.' + Math.floor(since)]);
    } catch (e) {
      setError('Cannot open the live feed: ' + e.message);
      return;
    }
    live.ws = ws;
    ws.onopen = function () { live.retry = 0; setError(null); };
    ws.onmessage = function (ev) {
      var m;
      try { m = JSON.parse(ev.data); } catch (e) { return; }
      onFrame(id, m);
    };
    ws.onclose = function (ev) {
      if (live.ws !== ws) { return; }
      live.ws = null;
      if (ev.code === 4001) {
        localStorage.removeItem(VIEWER_KEY);
        stopLive();
        showLogin('The viewer token was revoked.');
        return;
      }
      var delay = Math.min(30000, 1000 * Math.pow(2, live.retry++));
      live.retryTimer = setTimeout(function () {
        if (live.selected === id) { openSocket(); }
      }, delay);
    };
  }

  function onFrame(id, m) {
    if (m.device_id !== id || id !== live.selected) { return; }
    if (m.type === 'reading') {
      addReading(m);
      live.lastRxMs = Date.now();
      var d = live.devices[id];
      if (d) { d.last_seen_ms = m.rx_ms; }
      scheduleRender();
    } else if (m.type === 'status') {
      var cur = live.devices[id] || { device_id: id };
      cur.online = m.online;
      cur.last_seen_ms = m.last_seen_ms;
      cur.outbox_depth = m.outbox_depth === undefined ? cur.outbox_depth : m.outbox_depth;
      cur.behind_ms = m.behind_ms === undefined ? cur.behind_ms : m.behind_ms;
      LOSSES.forEach(function (k) { cur[k[0]] = m[k[0]] === undefined ? cur[k[0]] : m[k[0]]; });
      if (!m.online) {
        cur.outbox_depth = null; cur.behind_ms = null;
        LOSSES.forEach(function (k) { cur[k[0]] = null; });
      }
      live.devices[id] = cur;
      if (m.online && !live.lastRxMs) { live.lastRxMs = Date.now(); }
      renderDevices();
      scheduleRender();
    } else if (m.type === 'replay_end') {
      scheduleRender();
    } else if (m.type === 'backfill') {
      // A backlog is draining: fetch the part inside the chart window.
      var from = Math.max(m.from_ts_ms, Date.now() - HOUR);
      if (m.to_ts_ms >= from) { queueFill(id, from, m.to_ts_ms + 1); }
      $('dev-note').textContent = 'catching up: ' + m.count + ' older readings received';
    }
  }

  function queueFill(id, from, to) {
    var r = live.fillRange;
    live.fillRange = r ? [Math.min(r[0], from), Math.max(r[1], to)] : [from, to];
    if (live.fillTimer) { return; }
    live.fillTimer = setTimeout(function () {
      var range = live.fillRange;
      live.fillTimer = null;
      live.fillRange = null;
      var q = '?from_ms=' + range[0] + '&to_ms=' + range[1] + '&limit=10000';
      api('/api/devices/' + encodeURIComponent(id) + '/readings' + q, live.token).then(function (body) {
        if (live.selected !== id) { return; }
        body.readings.forEach(addReading);
        scheduleRender();
      }).catch(function () { /* the next summary retries */ });
    }, 1500);
  }

  function addReading(r) {
    var key = r.epoch + ':' + r.seq;
    if (live.keys[key]) { return; }
    live.keys[key] = true;
    var pt = { key: key, ts: r.ts_ms, p: r.power_w, v: r.voltage_v, i: r.current_a, e: r.energy_wh };
    var pts = live.points;
    if (!pts.length || pts[pts.length - 1].ts <= pt.ts) {
      pts.push(pt);
    } else {
      var lo = 0, hi = pts.length;
      while (lo < hi) { var mid = (lo + hi) >> 1; if (pts[mid].ts <= pt.ts) { lo = mid + 1; } else { hi = mid; } }
      pts.splice(lo, 0, pt);
    }
    if (!live.latest || pt.ts >= live.latest.ts) { live.latest = pt; }
    var cut = Date.now() - HOUR;
    while (pts.length && pts[0].ts < cut) { delete live.keys[pts[0].key]; pts.shift(); }
  }

  var renderQueued = false;
  function scheduleRender() {
    if (renderQueued) { return; }
    renderQueued = true;
    requestAnimationFrame(function () { renderQueued = false; renderDetail(); });
  }

  // The edge's loss counters (its status frame, since it started) and how
  // they are shown.
  var LOSSES = [
    ['dropped', 'dropped (spool full)'],
    ['dropped_disk_full', 'dropped (disk full)'],
    ['dropped_damaged', 'lost (damaged spool records)'],
    ['unwritten', 'held in memory (spool not writable)']
  ];

  function lossesOf(d) {
    var parts = [];
    if (d) {
      LOSSES.forEach(function (k) { if (d[k[0]]) { parts.push(d[k[0]] + ' ' + k[1]); } });
      if (d.quarantined) { parts.push(d.quarantined + ' refused by the hub (quarantined)'); }
    }
    return parts.length ? 'On this device: ' + parts.join(', ') + '.' : '';
  }

  function renderDetail() {
    var id = live.selected;
    if (!id) { return; }
    var d = live.devices[id];
    var st = stateOf(d);
    var badge = $('dev-state');
    badge.className = 'badge ' + st;
    badge.textContent = st;
    var note = '';
    if (st === 'offline') {
      note = 'offline since ' + fmtTime(d && d.last_seen_ms);
    } else if (st === 'stale') {
      note = 'connected, but no reading since ' + fmtTime(live.lastRxMs);
    } else if (d && d.outbox_depth && d.behind_ms >= HELD_MS) {
      note = 'catching up: ' + d.outbox_depth + ' readings still queued on the device' +
        (d.behind_ms ? ', ' + fmtDuration(d.behind_ms) + ' behind' : '');
    } else if (live.latest) {
      note = 'last reading ' + fmtTime(live.latest.ts);
    }
    if (note) { $('dev-note').textContent = note; }
    $('dev-losses').textContent = lossesOf(d);
    var x = live.latest || {};
    $('v-power').textContent = fmtNum(x.p, 1, 'W');
    $('v-voltage').textContent = fmtNum(x.v, 1, 'V');
    $('v-current').textContent = fmtNum(x.i, 2, 'A');
    var today = (typeof x.e === 'number' && live.dayStartEnergy !== null) ? (x.e - live.dayStartEnergy) / 1000 : null;
    $('v-energy').textContent = fmtNum(today, 2, 'kWh');
    drawChart();
    drawEnergy();
  }

  // ---------------------------------------------------------------- chart
  function drawChart() {
    var c = $('chart');
    var dpr = window.devicePixelRatio || 1;
    var w = c.clientWidth || 800, h = c.clientHeight || 300;
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
      c.width = Math.round(w * dpr);
      c.height = Math.round(h * dpr);
    }
    var g = c.getContext('2d');
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    var css = getComputedStyle(document.documentElement);
    var padL = 52, padR = 44, padT = 10, padB = 24;
    var now = Date.now(), t0 = now - HOUR;
    var pts = live.points;
    function xOf(ts) { return padL + (ts - t0) / HOUR * (w - padL - padR); }
    function range(field) {
      var lo = Infinity, hi = -Infinity;
      pts.forEach(function (p) { var v = p[field]; if (typeof v === 'number') { lo = Math.min(lo, v); hi = Math.max(hi, v); } });
      if (lo === Infinity) { return null; }
      if (hi - lo < 1e-9) { lo -= 1; hi += 1; }
      var pad = (hi - lo) * 0.08;
      return [lo - pad, hi + pad];
    }
    // Grid and time axis (every 10 minutes).
    g.strokeStyle = '#eceff3';
    g.fillStyle = '#6b7485';
    g.font = '11px system-ui, sans-serif';
    g.lineWidth = 1;
    for (var m = 0; m <= 60; m += 10) {
      var tx = xOf(t0 + m * 60000);
      g.beginPath(); g.moveTo(tx, padT); g.lineTo(tx, h - padB); g.stroke();
      var label = m === 60 ? 'now' : '-' + (60 - m) + 'm';
      g.fillText(label, tx - 10, h - 7);
    }
    if (!pts.length) {
      g.fillText('waiting for readings…', padL + 10, padT + 20);
      return;
    }
    function series(field, color, width, axis) {
      var r = range(field);
      if (!r) { return; }
      function yOf(v) { return padT + (1 - (v - r[0]) / (r[1] - r[0])) * (h - padT - padB); }
      g.strokeStyle = color;
      g.lineWidth = width;
      g.beginPath();
      var started = false, lastTs = null;
      pts.forEach(function (p) {
        var v = p[field];
        if (typeof v !== 'number') { return; }
        var px = xOf(p.ts), py = yOf(v);
        // Break the line over gaps longer than 2 minutes.
        if (!started || (lastTs !== null && p.ts - lastTs > 120000)) { g.moveTo(px, py); started = true; } else { g.lineTo(px, py); }
        lastTs = p.ts;
      });
      g.stroke();
      g.fillStyle = color;
      var digits = (r[1] - r[0]) < 10 ? 1 : 0;
      if (axis === 'left') {
        for (var k = 0; k <= 4; k++) {
          var val = r[0] + (r[1] - r[0]) * k / 4;
          g.fillText(val.toFixed(digits), 4, yOf(val) + 4);
        }
      } else {
        g.fillText(r[1].toFixed(digits), w - padR + 4, yOf(r[1]) + (axis === 'right1' ? 10 : 22));
        g.fillText(r[0].toFixed(digits), w - padR + 4, yOf(r[0]) - (axis === 'right1' ? 4 : 16));
      }
    }
    series('v', css.getPropertyValue('--v').trim() || '#8e24aa', 1, 'right1');
    series('i', css.getPropertyValue('--i').trim() || '#ef6c00', 1, 'right2');
    series('p', css.getPropertyValue('--p').trim() || '#1565c0', 2, 'left');
  }

  function stopLive() {
    stopEnergy();
    closeSocket();
    clearInterval(live.listTimer);
    clearInterval(live.tickTimer);
    live.selected = null;
    live.devices = {};
    resetSeries();
    show($('detail'), false);
  }

  // ---------------------------------------------------------------- energy
  // Today by hour and the last 30 days by day, in the browser's time zone:
  // the hub cuts the buckets at local boundaries (23- and 25-hour days
  // included); the page sums the device's meters per bucket, marks buckets
  // with gaps, counter resets and implausible jumps, and downloads the
  // readings of a chart's range as CSV.
  var ENERGY_REFRESH_MS = 60 * 1000;
  var energy = { id: null, timer: null, charts: {} };

  function browserZone() {
    try { return Intl.DateTimeFormat().resolvedOptions().timeZone || 'UTC'; } catch (e) { return 'UTC'; }
  }

  function localMidnight(daysBack) {
    var d = new Date();
    d.setHours(0, 0, 0, 0);
    d.setDate(d.getDate() - daysBack);
    return d.getTime();
  }

  function localDate(ms) {
    var d = new Date(ms);
    function two(n) { return (n < 10 ? '0' : '') + n; }
    return d.getFullYear() + '-' + two(d.getMonth() + 1) + '-' + two(d.getDate());
  }

  function startEnergy(id) {
    stopEnergy();
    energy.id = id;
    show($('energy'), true);
    $('csv-status').textContent = '';
    loadEnergy();
    energy.timer = setInterval(loadEnergy, ENERGY_REFRESH_MS);
  }

  function stopEnergy() {
    clearInterval(energy.timer);
    energy.timer = null;
    energy.id = null;
    energy.charts = {};
    show($('energy'), false);
  }

  function loadEnergy() {
    var id = energy.id;
    if (!id) { return; }
    var tz = browserZone();
    $('energy-tz').textContent = 'local time: ' + tz;
    var tomorrow = localMidnight(-1);
    [['hours', 'hour', localMidnight(0)], ['days', 'day', localMidnight(29)]].forEach(function (c) {
      var q = '?from_ms=' + c[2] + '&to_ms=' + tomorrow + '&bucket=' + c[1] + '&tz=' + encodeURIComponent(tz);
      api('/api/devices/' + encodeURIComponent(id) + '/energy' + q, live.token).then(function (body) {
        if (energy.id !== id) { return; }
        energy.charts[c[0]] = { from: c[2], to: tomorrow, tz: body.tz, bars: mergeMeters(body.meters) };
        drawEnergy();
      }).catch(function (e) {
        if (energy.id === id) { $('energy-note').textContent = 'Energy not available: ' + e.message; }
      });
    });
  }

  // One bar per bucket over all meters: energy and counts summed, coverage
  // the lowest of the meters (a gap in any meter shows).
  function mergeMeters(meters) {
    var out = [];
    meters.forEach(function (m) {
      m.buckets.forEach(function (b, k) {
        var o = out[k];
        if (!o) {
          o = out[k] = { start: b.start_ms, end: b.end_ms, wh: 0, samples: 0, coverage: 1, resets: 0, flagged: 0 };
        }
        o.wh += b.energy_wh;
        o.samples += b.samples;
        o.coverage = Math.min(o.coverage, b.coverage);
        o.resets += b.resets;
        o.flagged += b.flagged;
      });
    });
    return out;
  }

  // A finished bucket whose readings do not cover all of it. The running
  // bucket is still filling and later ones have not started: neither is
  // a gap.
  function isGap(b, now) { return b.end <= now && b.coverage < 0.999; }

  function drawEnergy() {
    if (!energy.id) { return; }
    var now = Date.now();
    var notes = [];
    var totals = {};
    [['hours', 'energy-hours', 'energy-today', 'hour'], ['days', 'energy-days', 'energy-month', 'day']].forEach(function (c) {
      var chart = energy.charts[c[0]];
      if (!chart) { return; }
      var t = drawBars($(c[1]), chart.bars, c[3], now);
      totals[c[0]] = t;
      $(c[2]).textContent = chart.bars.length ? (t.wh / 1000).toFixed(2) + ' kWh' : '';
    });
    var h = totals.hours, d = totals.days;
    function gaps(x, unit, when) {
      var part = x.gaps - x.empty;
      if (x.empty) { notes.push(when + x.empty + ' ' + unit + (x.empty === 1 ? '' : 's') + ' without readings'); when = ''; }
      if (part) { notes.push(when + part + ' ' + unit + (part === 1 ? '' : 's') + ' with gaps'); }
    }
    if (h) { gaps(h, 'hour', 'today: '); }
    if (d) { gaps(d, 'day', 'last 30 days: '); }
    if (d && d.resets) { notes.push(d.resets + (d.resets === 1 ? ' counter reset' : ' counter resets')); }
    if (d && d.flagged) { notes.push(d.flagged + (d.flagged === 1 ? ' implausible jump' : ' implausible jumps') + ' not counted'); }
    if (d && !energy.charts.days.bars.length) { notes.push('no energy readings from this device yet'); }
    $('energy-note').textContent = notes.length ? notes.join(' · ') : (d ? 'no gaps, resets or implausible jumps in the last 30 days' : '');
  }

  function drawBars(c, bars, unit, now) {
    var dpr = window.devicePixelRatio || 1;
    var w = c.clientWidth || 800, h = c.clientHeight || 200;
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
      c.width = Math.round(w * dpr);
      c.height = Math.round(h * dpr);
    }
    var g = c.getContext('2d');
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    var css = getComputedStyle(document.documentElement);
    function color(name, dflt) { return css.getPropertyValue(name).trim() || dflt; }
    var padL = 52, padR = 12, padT = 16, padB = 22;
    var plotH = h - padT - padB;
    var t = { wh: 0, gaps: 0, empty: 0, resets: 0, flagged: 0 };
    var max = 0;
    bars.forEach(function (b) {
      t.wh += b.wh;
      t.resets += b.resets;
      t.flagged += b.flagged;
      if (isGap(b, now)) { t.gaps++; if (!b.samples) { t.empty++; } }
      max = Math.max(max, b.wh / 1000);
    });
    g.font = '11px system-ui, sans-serif';
    g.lineWidth = 1;
    if (!bars.length) {
      g.fillStyle = color('--muted', '#6b7485');
      g.fillText('no energy readings in this range', padL + 10, padT + 20);
    } else {
      // Value axis: four steps of a round size.
      var step = Math.pow(10, Math.floor(Math.log10(Math.max(max, 0.001) / 4)));
      [1, 2, 5, 10].some(function (m) { if (step * m * 4 >= max) { step *= m; return true; } return false; });
      var top = step * 4;
      g.strokeStyle = '#eceff3';
      g.fillStyle = color('--muted', '#6b7485');
      for (var k = 0; k <= 4; k++) {
        var gy = padT + plotH - plotH * k / 4;
        g.beginPath(); g.moveTo(padL, gy); g.lineTo(w - padR, gy); g.stroke();
        g.fillText((step * k).toFixed(step < 0.1 ? 2 : step < 1 ? 1 : 0) + ' kWh', 2, gy + 4);
      }
      var bw = (w - padL - padR) / bars.length;
      bars.forEach(function (b, i) {
        var x = padL + i * bw;
        var d = new Date(b.start);
        var label = unit === 'hour'
          ? (d.getHours() % 3 === 0 && d.getMinutes() === 0 ? String(d.getHours()) + 'h' : null)
          : ((bars.length - 1 - i) % 5 === 0 ? d.toLocaleDateString(undefined, { month: 'short', day: 'numeric' }) : null);
        if (label) {
          g.fillStyle = color('--muted', '#6b7485');
          g.fillText(label, x, h - 6);
        }
        if (b.start > now) { return; }
        if (isGap(b, now)) {
          // The whole column: grey without readings, else amber, stronger
          // the less of the bucket the readings cover.
          g.globalAlpha = b.samples ? 0.35 + 0.65 * (1 - b.coverage) : 1;
          g.fillStyle = b.samples ? color('--gap', '#f3c98b') : color('--nodata', '#e6e9ee');
          g.fillRect(x + 1, padT, Math.max(1, bw - 2), plotH);
          g.globalAlpha = 1;
        }
        var bh = b.wh / 1000 / top * plotH;
        g.fillStyle = color('--e', '#2e7d32');
        g.fillRect(x + 1, padT + plotH - bh, Math.max(1, bw - 2), bh);
        var mark = padT + plotH - bh - 3;
        if (b.resets) {
          g.fillStyle = color('--bad', '#b3261e');
          g.fillText('\u25BC', x + bw / 2 - 4, Math.max(padT, mark));
          mark -= 11;
        }
        if (b.flagged) {
          g.fillStyle = color('--warn', '#a86400');
          g.fillText('!', x + bw / 2 - 2, Math.max(padT, mark));
        }
      });
    }
    // What the chart shows, for tests and tools reading the page.
    c.dataset.bars = String(bars.length);
    c.dataset.gaps = String(t.gaps);
    c.dataset.empty = String(t.empty);
    c.dataset.resets = String(t.resets);
    c.dataset.flagged = String(t.flagged);
    c.dataset.kwh = (t.wh / 1000).toFixed(3);
    c.dataset.first = bars.length ? String(bars[0].start) : '';
    return t;
  }

  // The readings of a chart's range as CSV. The token goes in the header,
  // so the file is fetched here and handed to the browser as a blob.
  function downloadCsv(which) {
    var chart = energy.charts[which];
    var id = energy.id;
    if (!chart || !id) { return; }
    var to = Math.min(chart.to, Date.now() + 1);
    var name = id + '_' + localDate(chart.from) + (which === 'days' ? '_' + localDate(to - 1) : '') + '.csv';
    var status = $('csv-status');
    status.textContent = 'preparing ' + name + '\u2026';
    fetch('/api/devices/' + encodeURIComponent(id) + '/readings.csv?from_ms=' + chart.from + '&to_ms=' + to, {
      headers: { 'Authorization': 'Bearer ' + live.token },
      cache: 'no-store',
      credentials: 'omit',
      referrerPolicy: 'no-referrer'
    }).then(function (r) {
      if (!r.ok) { throw new Error('HTTP ' + r.status); }
      return r.blob();
    }).then(function (blob) {
      var url = URL.createObjectURL(blob);
      var a = document.createElement('a');
      a.href = url;
      a.download = name;
      document.body.appendChild(a);
      a.click();
      a.remove();
      setTimeout(function () { URL.revokeObjectURL(url); }, 60000);
      status.textContent = 'saved ' + name + ' (' + (blob.size / 1024).toFixed(1) + ' kB)';
    }).catch(function (e) {
      status.textContent = 'CSV download failed: ' + e.message;
    });
  }

  // ---------------------------------------------------------------- fleet
  // Every device in the token's scope in one table, refreshed from
  // /api/devices every 5 s and today's energy from /api/fleet/energy every
  // 30 s (the browser's local day) — never a socket per device. Rows are
  // kept per device and reused: a refresh writes only the cells whose text
  // changed, and touches the row order only when it changed. Sorting and
  // filtering run in memory.
  var DASH = '\u2014';
  var fleet = {
    timer: null,
    energyTimer: null,
    rows: {},          // id -> {tr, cells, text, dot, state, d}
    energy: {},        // id -> {wh, coverage}
    energyTz: null,
    sortKey: 'device_id',
    sortDir: 1,
    shownKey: null,    // the displayed order, joined
    renders: 0,
    start: function () {
      fleet.stop();
      if (!viewerToken()) { show($('fleet'), false); return; }
      show($('fleet'), true);
      // The energy after the first list, so the two renders do not meet.
      fleet.load().then(fleet.loadEnergy);
      fleet.timer = setInterval(fleet.load, 5000);
      fleet.energyTimer = setInterval(fleet.loadEnergy, 30000);
    },
    stop: function () {
      clearInterval(fleet.timer);
      clearInterval(fleet.energyTimer);
      fleet.timer = fleet.energyTimer = null;
    },
    error: function (msg) { $('fleet-error').textContent = msg || ''; show($('fleet-error'), !!msg); },
    fail: function (e) {
      if (e.status === 401 || e.status === 403) {
        localStorage.removeItem(VIEWER_KEY);
        stopLive();
        showLogin('That viewer token was not accepted (revoked or mistyped).');
      } else {
        fleet.error('Cannot reach the hub: ' + e.message);
      }
    },
    load: function () {
      var token = viewerToken();
      if (!token) { return Promise.resolve(); }
      return api('/api/devices', token).then(function (body) {
        fleet.error(null);
        fleet.apply(body.devices);
      }).catch(fleet.fail);
    },
    loadEnergy: function () {
      var token = viewerToken();
      if (!token) { return; }
      var midnight = new Date();
      midnight.setHours(0, 0, 0, 0);
      var from = midnight.getTime();
      var q = '?from_ms=' + from + '&to_ms=' + Math.max(Date.now(), from + 1);
      var tz = browserZone();
      if (tz) { q += '&tz=' + encodeURIComponent(tz); }
      api('/api/fleet/energy' + q, token).then(function (body) {
        var energy = {};
        body.devices.forEach(function (d) { energy[d.device_id] = { wh: d.energy_wh, coverage: d.coverage }; });
        fleet.energy = energy;
        fleet.energyTz = body.tz;
        var t0 = performance.now();
        Object.keys(fleet.rows).forEach(function (id) { fleet.fill(fleet.rows[id], Date.now()); });
        fleet.arrange();
        fleet.timed(t0, false);
      }).catch(function (e) {
        if (e.status === 401 || e.status === 403) { fleet.fail(e); return; }
        $('fleet-note').textContent = 'today\u2019s energy unavailable: ' + e.message;
      });
    },
    // Applies a device list: new rows are built off-document and inserted
    // in one pass; known rows get only their changed cells.
    apply: function (list) {
      var t0 = performance.now();
      var first = fleet.renders === 0;
      var seen = {};
      var now = Date.now();
      list.forEach(function (d) {
        seen[d.device_id] = true;
        var r = fleet.rows[d.device_id];
        if (!r) { r = fleet.rows[d.device_id] = fleet.row(d.device_id); }
        r.d = d;
        fleet.fill(r, now);
      });
      Object.keys(fleet.rows).forEach(function (id) {
        if (!seen[id]) { fleet.rows[id].tr.remove(); delete fleet.rows[id]; fleet.shownKey = null; }
      });
      fleet.arrange();
      if (first) { $('fleet-table').dataset.buildMs = (performance.now() - t0).toFixed(1); }
      fleet.timed(t0, first);
    },
    // Records how long a render took until the frame after it (style and
    // layout included): data-render-ms for the first, data-update-ms and
    // data-max-update-ms for later ones.
    timed: function (t0, first) {
      fleet.renders++;
      var table = $('fleet-table');
      requestAnimationFrame(function () {
        setTimeout(function () {
          var ms = (performance.now() - t0).toFixed(1);
          if (first) { table.dataset.renderMs = ms; }
          table.dataset.updateMs = ms;
          if (!first) {
            table.dataset.maxUpdateMs = String(Math.max(parseFloat(table.dataset.maxUpdateMs || '0'), parseFloat(ms)));
            table.dataset.updates = ((table.dataset.updates ? table.dataset.updates + ' ' : '') + ms).split(' ').slice(-20).join(' ');
          }
          table.dataset.renders = String(fleet.renders);
        }, 0);
      });
    },
    row: function (id) {
      var tr = document.createElement('tr');
      tr.dataset.device = id;
      var cells = [];
      var cls = ['name', 'state', 'num power', 'num energy', 'backlog', 'seen', 'hub'];
      for (var i = 0; i < cls.length; i++) {
        var td = document.createElement('td');
        td.className = cls[i];
        tr.appendChild(td);
        cells.push(td);
      }
      cells[0].textContent = id;
      var dot = el('span', null, 'dot');
      var state = document.createTextNode('');
      cells[1].appendChild(dot);
      cells[1].appendChild(state);
      return { id: id, tr: tr, cells: cells, text: [id, '', '', '', '', '', ''], dot: dot, state: state, d: null };
    },
    set: function (r, i, text) {
      if (r.text[i] !== text) { r.text[i] = text; r.cells[i].textContent = text; }
    },
    fill: function (r, now) {
      var d = r.d;
      if (!d) { return; }
      var st = d.online ? 'online' : 'offline';
      if (r.text[1] !== st) {
        r.text[1] = st;
        r.state.nodeValue = st;
        r.dot.className = 'dot ' + st;
      }
      var p = fleetPower(d);
      fleet.set(r, 2, p === null ? DASH : fmtPower(p));
      var e = fleet.energy[r.id];
      fleet.set(r, 3, e ? (e.wh / 1000).toFixed(2) + ' kWh' : DASH);
      var b = fleetBacklog(d);
      fleet.set(r, 4, b);
      r.cells[4].classList.toggle('behind', / behind/.test(b));
      fleet.set(r, 5, d.online ? 'now' : fmtAgo(d.last_seen_ms, now));
      fleet.set(r, 6, typeof d.hub === 'string' && d.hub ? d.hub : DASH);
    },
    value: function (r) {
      var d = r.d || {};
      switch (fleet.sortKey) {
        case 'state': return d.online ? 1 : 0;
        case 'power': return fleetPower(d);
        case 'energy': return fleet.energy[r.id] ? fleet.energy[r.id].wh : null;
        case 'behind': return typeof d.behind_ms === 'number' ? d.behind_ms : null;
        case 'seen': return typeof d.last_seen_ms === 'number' ? d.last_seen_ms : null;
        case 'hub': return typeof d.hub === 'string' ? d.hub : null;
        default: return r.id;
      }
    },
    matches: function (r, words, state) {
      var d = r.d || {};
      if (state && (state === 'online') !== !!d.online) { return false; }
      for (var i = 0; i < words.length; i++) {
        var w = words[i];
        if (w === 'online' || w === 'offline') {
          if ((w === 'online') !== !!d.online) { return false; }
        } else if (r.id.toLowerCase().indexOf(w) < 0 && String(d.hub || '').toLowerCase().indexOf(w) < 0) {
          return false;
        }
      }
      return true;
    },
    // Sorts and filters in memory; rewrites the table body only when the
    // shown rows or their order changed.
    arrange: function () {
      var words = $('fleet-filter').value.trim().toLowerCase().split(/\s+/).filter(Boolean);
      var state = $('fleet-state').value;
      var all = Object.keys(fleet.rows).map(function (id) { return fleet.rows[id]; });
      var online = 0;
      var rows = all.filter(function (r) {
        if (r.d && r.d.online) { online++; }
        return fleet.matches(r, words, state);
      });
      var dir = fleet.sortDir;
      rows.forEach(function (r) { r.v = fleet.value(r); });
      rows.sort(function (a, b) {
        // Unknown values last, whatever the direction; ties by id.
        if (a.v === null || b.v === null) {
          if (a.v !== b.v) { return a.v === null ? 1 : -1; }
        } else if (a.v < b.v) { return -dir; } else if (a.v > b.v) { return dir; }
        return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
      });
      var key = rows.map(function (r) { return r.id; }).join('\n');
      if (key !== fleet.shownKey) {
        fleet.shownKey = key;
        var frag = document.createDocumentFragment();
        rows.forEach(function (r) { frag.appendChild(r.tr); });
        var body = $('fleet-rows');
        body.textContent = '';
        body.appendChild(frag);
      }
      var total = all.length;
      $('fleet-count').textContent = (rows.length === total ? total + ' devices' : rows.length + ' of ' + total + ' devices shown') +
        ' \u00b7 ' + online + ' online';
      var table = $('fleet-table');
      table.dataset.rows = String(total);
      table.dataset.shown = String(rows.length);
      if (fleet.energyTz) {
        var sum = 0;
        Object.keys(fleet.energy).forEach(function (id) { if (fleet.rows[id]) { sum += fleet.energy[id].wh; } });
        $('fleet-note').textContent = 'Today (' + fleet.energyTz + '): ' + (sum / 1000).toFixed(2) + ' kWh in all \u00b7 updated ' + new Date().toLocaleTimeString();
      }
      if (!total) { $('fleet-note').textContent = 'No devices in this token\u2019s scope yet.'; }
    },
    sortBy: function (key) {
      if (fleet.sortKey === key) {
        fleet.sortDir = -fleet.sortDir;
      } else {
        fleet.sortKey = key;
        // Names ascending, online first, numbers and times largest first.
        fleet.sortDir = key === 'device_id' || key === 'hub' ? 1 : -1;
      }
      var ths = $('fleet-table').querySelectorAll('th[data-sort]');
      for (var i = 0; i < ths.length; i++) {
        var on = ths[i].dataset.sort === key;
        ths[i].classList.toggle('sorted', on);
        ths[i].classList.toggle('desc', on && fleet.sortDir < 0);
      }
      fleet.arrange();
    },
    open: function (id) {
      selectTab('live');
      selectDevice(id);
      $('detail').scrollIntoView();
    }
  };

  function browserZone() {
    try { return Intl.DateTimeFormat().resolvedOptions().timeZone || null; } catch (e) { return null; }
  }
  // The device's power now: its meters' last power summed, or null when
  // the hub does not report last readings (or none has power).
  function fleetPower(d) {
    if (!d || !Array.isArray(d.last)) { return null; }
    var sum = null;
    d.last.forEach(function (m) {
      if (m && typeof m.power_w === 'number' && isFinite(m.power_w)) { sum = (sum || 0) + m.power_w; }
    });
    return sum;
  }
  function fmtPower(w) {
    if (Math.abs(w) >= 10000) { return (w / 1000).toFixed(1) + ' kW'; }
    return (Math.abs(w) < 100 ? w.toFixed(1) : w.toFixed(0)) + ' W';
  }
  function fmtSpan(ms) {
    var s = Math.round(ms / 1000);
    if (s < 120) { return s + ' s'; }
    if (s < 7200) { return Math.round(s / 60) + ' min'; }
    if (s < 48 * 3600) { return Math.round(s / 3600) + ' h'; }
    return Math.round(s / 86400) + ' d';
  }
  function fmtAgo(ms, now) {
    if (typeof ms !== 'number') { return 'never'; }
    return now - ms < 1000 ? 'now' : fmtSpan(now - ms) + ' ago';
  }
  // "3 h behind" (with the queued count), "up to date", or a dash when
  // the device does not report its outbox. Readings younger than
  // HELD_MS are the ones the hub holds for its commit, not a backlog.
  function fleetBacklog(d) {
    if (typeof d.behind_ms !== 'number') { return DASH; }
    var queued = typeof d.outbox_depth === 'number' && d.outbox_depth > 0 ? ' \u00b7 ' + d.outbox_depth + ' queued' : '';
    if (d.behind_ms < HELD_MS || (d.behind_ms < 60000 && !queued)) { return 'up to date'; }
    return fmtSpan(Math.max(0, d.behind_ms)) + ' behind' + queued;
  }

  // ---------------------------------------------------------------- admin
  var admin = {
    timer: null,
    start: function () {
      var t = sessionStorage.getItem(ADMIN_KEY);
      show($('admin-login'), !t);
      show($('admin'), !!t);
      if (!t) { return; }
      admin.refresh();
      clearInterval(admin.timer);
      admin.timer = setInterval(admin.refresh, 5000);
    },
    stop: function () { clearInterval(admin.timer); admin.timer = null; },
    token: function () { return sessionStorage.getItem(ADMIN_KEY); },
    error: function (msg) { $('admin-error').textContent = msg || ''; show($('admin-error'), !!msg); },
    fail: function (e) {
      if (e.status === 401 || e.status === 403) {
        sessionStorage.removeItem(ADMIN_KEY);
        admin.stop();
        admin.start();
        admin.error('That admin token was not accepted.');
      } else {
        admin.error(e.message);
      }
    },
    refresh: function () {
      var t = admin.token();
      if (!t) { return; }
      Promise.all([api('/api/admin/devices', t), api('/api/admin/viewers', t)]).then(function (r) {
        admin.error(null);
        admin.renderDevices(r[0].devices);
        admin.renderViewers(r[1].viewers);
      }).catch(admin.fail);
    },
    action: function (path, body, then) {
      api(path, admin.token(), { method: 'POST', body: body || {} }).then(function (r) {
        if (then) { then(r); }
        admin.refresh();
      }).catch(admin.fail);
    },
    secret: function (title, text) {
      $('secret-title').textContent = title;
      $('secret-text').textContent = text;
      show($('secret'), true);
    },
    renderDevices: function (list) {
      var tb = $('admin-devices').querySelector('tbody');
      tb.textContent = '';
      list.forEach(function (d) {
        var tr = el('tr');
        tr.appendChild(el('td', d.device_id));
        var st = d.revoked_ms ? 'revoked' : (d.online ? 'online' : 'offline');
        var td = el('td');
        td.appendChild(el('span', null, 'dot ' + (st === 'online' ? 'online' : 'offline')));
        td.appendChild(document.createTextNode(st));
        tr.appendChild(td);
        tr.appendChild(el('td', fmtTime(d.last_seen_ms)));
        tr.appendChild(el('td', d.outbox_depth === null || d.outbox_depth === undefined ? '–' : d.outbox_depth));
        tr.appendChild(el('td', String(d.quarantined || 0), 'quarantined'));
        var acts = el('td');
        var rot = el('button', 'Rotate', 'small');
        rot.type = 'button';
        rot.addEventListener('click', function () {
          if (!confirm('Give ' + d.device_id + ' a new token? The old one stops working at once.')) { return; }
          admin.action('/api/admin/devices/' + encodeURIComponent(d.device_id) + '/rotate', {}, function (r) {
            admin.secret('New token for ' + r.device_id, r.env);
          });
        });
        acts.appendChild(rot);
        if (!d.revoked_ms) {
          var rev = el('button', 'Revoke', 'small danger');
          rev.type = 'button';
          rev.addEventListener('click', function () {
            if (!confirm('Revoke ' + d.device_id + '? It is disconnected at once.')) { return; }
            admin.action('/api/admin/devices/' + encodeURIComponent(d.device_id) + '/revoke');
          });
          acts.appendChild(rev);
        }
        tr.appendChild(acts);
        tb.appendChild(tr);
      });
    },
    renderViewers: function (list) {
      var tb = $('admin-viewers').querySelector('tbody');
      tb.textContent = '';
      list.forEach(function (v) {
        var tr = el('tr');
        tr.appendChild(el('td', v.name));
        tr.appendChild(el('td', v.all_devices ? 'all devices' : v.devices.join(', ')));
        tr.appendChild(el('td', v.revoked_ms ? 'revoked' : 'active'));
        var acts = el('td');
        if (!v.revoked_ms) {
          var rev = el('button', 'Revoke', 'small danger');
          rev.type = 'button';
          rev.addEventListener('click', function () {
            if (!confirm('Revoke viewer ' + v.name + '? Its dashboards close.')) { return; }
            admin.action('/api/admin/viewers/' + encodeURIComponent(v.name) + '/revoke');
          });
          acts.appendChild(rev);
        }
        tr.appendChild(acts);
        tb.appendChild(tr);
      });
    }
  };

  // ---------------------------------------------------------------- wiring
  document.addEventListener('DOMContentLoaded', function () {
    $('tab-live').addEventListener('click', function () { selectTab('live'); });
    $('tab-admin').addEventListener('click', function () { selectTab('admin'); });
    $('tab-fleet').addEventListener('click', function () { selectTab('fleet'); });
    $('fleet-filter').addEventListener('input', fleet.arrange);
    $('fleet-state').addEventListener('change', fleet.arrange);
    $('fleet-table').querySelector('thead').addEventListener('click', function (ev) {
      var th = ev.target.closest('th[data-sort]');
      if (th) { fleet.sortBy(th.dataset.sort); }
    });
    // One listener for every row.
    $('fleet-rows').addEventListener('click', function (ev) {
      var tr = ev.target.closest('tr[data-device]');
      if (tr) { fleet.open(tr.dataset.device); }
    });
    $('login').addEventListener('submit', function (ev) {
      ev.preventDefault();
      var t = $('token').value.trim();
      if (!t) { return; }
      localStorage.setItem(VIEWER_KEY, t);
      $('token').value = '';
      startLive();
      if (currentTab === 'fleet') { fleet.start(); }
    });
    $('forget').addEventListener('click', function () {
      localStorage.removeItem(VIEWER_KEY);
      stopLive();
      showLogin();
    });
    $('admin-login').addEventListener('submit', function (ev) {
      ev.preventDefault();
      var t = $('admin-token').value.trim();
      if (!t) { return; }
      sessionStorage.setItem(ADMIN_KEY, t);
      $('admin-token').value = '';
      admin.error(null);
      admin.start();
    });
    $('admin-forget').addEventListener('click', function () {
      sessionStorage.removeItem(ADMIN_KEY);
      admin.stop();
      admin.start();
    });
    $('add-device').addEventListener('submit', function (ev) {
      ev.preventDefault();
      var id = $('new-device').value.trim();
      if (!id) { return; }
      admin.action('/api/admin/devices', { device_id: id }, function (r) {
        $('new-device').value = '';
        admin.secret('Token for ' + r.device_id + ' (put this line in the device\u2019s env file)', r.env);
      });
    });
    $('add-viewer').addEventListener('submit', function (ev) {
      ev.preventDefault();
      var name = $('new-viewer').value.trim();
      var devs = $('new-viewer-devices').value.trim();
      if (!name || !devs) { return; }
      var body = devs === '*' ? { name: name, all_devices: true }
        : { name: name, devices: devs.split(',').map(function (s) { return s.trim(); }).filter(Boolean) };
      admin.action('/api/admin/viewers', body, function (r) {
        $('new-viewer').value = '';
        $('new-viewer-devices').value = '';
        admin.secret('Viewer token for ' + r.name, r.token);
      });
    });
    $('secret-copy').addEventListener('click', function () {
      var text = $('secret-text').textContent;
      if (navigator.clipboard && navigator.clipboard.writeText) {
        navigator.clipboard.writeText(text).then(function () { $('secret-copy').textContent = 'Copied'; });
      } else {
        var r = document.createRange();
        r.selectNodeContents($('secret-text'));
        var s = window.getSelection();
        s.removeAllRanges();
        s.addRange(r);
        document.execCommand('copy');
        $('secret-copy').textContent = 'Copied';
      }
    });
    $('secret-close').addEventListener('click', function () {
      $('secret-text').textContent = '';
      $('secret-copy').textContent = 'Copy';
      show($('secret'), false);
    });
    $('csv-hours').addEventListener('click', function () { downloadCsv('hours'); });
    $('csv-days').addEventListener('click', function () { downloadCsv('days'); });
    window.addEventListener('resize', scheduleRender);
    selectTab(location.hash === '#fleet' ? 'fleet' : 'live');
    startLive();
  });
}());
