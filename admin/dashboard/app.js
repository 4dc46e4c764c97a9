// The sidecar dashboard: renders the /status document, live from
// /status/stream (server-sent events), or by polling /status every 500ms
// where the stream is not available. No dependencies; text goes in with
// textContent only.
"use strict";

(function () {
  const POLL_MS = 500;
  const MAX_EVENTS = 50;

  let prev = null;          // the last document rendered
  let uptimeAt = null;      // [uptime seconds, Date.now() when received]
  let lastUpdate = 0;
  const events = [];

  // el builds an element: el("td", {class: "num"}, "12", otherNode).
  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") e.className = v;
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const k of kids) {
      if (k === undefined || k === null || k === false) continue;
      e.append(k instanceof Node ? k : document.createTextNode(String(k)));
    }
    return e;
  }

  function badge(kind, text, title) {
    return el("span", { class: "badge badge-" + kind, title: title }, text);
  }

  function replace(id, ...nodes) {
    const box = document.getElementById(id);
    box.replaceChildren(...nodes.filter((n) => n));
  }

  function duration(s) {
    if (s === undefined || s === null || isNaN(s)) return "–";
    s = Math.max(0, s);
    if (s < 1) return Math.round(s * 1000) + " ms";
    if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
    const m = Math.floor(s / 60), h = Math.floor(m / 60), d = Math.floor(h / 24);
    if (d > 0) return d + "d " + (h % 24) + "h";
    if (h > 0) return h + "h " + (m % 60) + "m";
    return m + "m " + Math.floor(s % 60) + "s";
  }

  function ago(iso) {
    if (!iso || iso.startsWith("0001-")) return "never";
    const t = Date.parse(iso);
    if (isNaN(t)) return "–";
    return duration((Date.now() - t) / 1000) + " ago";
  }

  function bytes(n) {
    if (!n) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return n.toFixed(i ? 1 : 0) + " " + units[i];
  }

  function num(v, digits) {
    if (v === undefined || v === null) return "–";
    return Number(v).toFixed(digits);
  }

  function kv(pairs) {
    const dl = el("dl", { class: "kv" });
    for (const [k, v] of pairs) {
      if (v === undefined || v === null || v === "") continue;
      dl.append(el("dt", null, k), el("dd", null, v));
    }
    return dl;
  }

  function table(caption, head, rows) {
    const thead = el("thead", null, el("tr", null,
      ...head.map((h) => el("th", { scope: "col", class: h.num ? "num" : null }, h.label || h))));
    return el("div", { class: "table-wrap" },
      el("table", null, caption ? el("caption", null, caption) : null, thead, el("tbody", null, ...rows)));
  }

  // --- sections ---

  function renderService(s) {
    if (!s) {
      replace("service", el("p", { class: "muted" }, "none: this sidecar registers no service (client only)"));
      return;
    }
    let reg = badge("ok", "✓ registered");
    if (s.deregistered) reg = badge("warn", "⏏ deregistered");
    else if (!s.registered) reg = badge("bad", "✕ not registered");
    const checkKind = { passing: "ok", warning: "warn", critical: "bad" }[s.check_status] || "info";
    const checkIcon = { passing: "✓", warning: "⚠", critical: "✕" }[s.check_status] || "?";
    replace("service", kv([
      ["Service", el("code", null, s.service_id)],
      ["Consul", reg],
      ["Check", el("span", null, badge(checkKind, checkIcon + " " + (s.check_status || "unknown")),
        s.overridden ? " (overridden)" : "")],
      ["Output", s.output],
      ["Last probe", ago(s.last_probe)],
      ["Last accepted", ago(s.last_update)],
      ["Registrations", s.registrations],
      ["Consul error", s.last_error ? badge("bad", s.last_error) : null],
    ]));
  }

  function renderApp(a) {
    if (!a) {
      replace("app", el("p", { class: "muted" }, "not run by this sidecar (no service.run)"));
      return;
    }
    const kind = a.state === "running" ? "ok" : (a.state === "starting" || a.state === "stopping" ? "warn" : "bad");
    const icon = kind === "ok" ? "✓" : kind === "warn" ? "◐" : "✕";
    let rss = a.rss_bytes ? bytes(a.rss_bytes) : null;
    if (rss && a.memory_limit_bytes) rss += " of " + bytes(a.memory_limit_bytes);
    replace("app", kv([
      ["State", badge(kind, icon + " " + a.state)],
      ["PID", a.pid || "–"],
      ["Up", a.uptime_seconds ? duration(a.uptime_seconds) : "–"],
      ["Restarts", a.restarts + " (policy " + a.restart_policy + ")"],
      ["Memory", rss],
      ["Command", a.command ? el("code", null, a.command) : null],
      ["Reason", a.reason],
      ["Last exit", a.last_exit ? a.last_exit + ", " + ago(a.last_exit_at) : null],
      ["Next start", a.next_start ? new Date(a.next_start).toLocaleTimeString() : null],
    ]));
  }

  const STATES = {
    serving: ["ok", "✓ serving"],
    ejected: ["bad", "✕ ejected"],
    breaker_open: ["bad", "✕ breaker open"],
    breaker_half_open: ["warn", "◐ breaker half-open"],
  };

  function renderRoutes(routes) {
    if (!routes || routes.length === 0) {
      replace("routes", el("p", { class: "muted" }, "no routes: no upstreams configured, and no request through the forward proxy yet"));
      return;
    }
    const out = [];
    for (const r of routes) {
      const eps = r.endpoints || [];
      let rate = 0, fails = 0;
      for (const e of eps) { rate += e.requests_per_second || 0; fails += (e.requests_per_second || 0) * (e.error_rate || 0); }
      const title = el("h3", null,
        el("span", null, el("code", null, r.listener), " → ", el("strong", null, r.service)),
        badge("info", r.balancer),
        r.protocol ? badge("info", r.protocol) : null,
        r.stale ? badge("warn", "⚠ stale set", "discovery serves the last set it had") : null,
        r.panic ? badge("bad", "⚠ panic: balancing over all", "too few nodes left after ejection") : null,
        r.error ? badge("bad", "✕ " + r.error) : null,
        el("span", { class: "muted" }, eps.length + (eps.length === 1 ? " node" : " nodes") +
          ", " + rate.toFixed(1) + " req/s" + (rate > 0 ? ", " + (100 * fails / rate).toFixed(1) + "% errors" : "")));
      const sec = el("section", { class: "route", "data-route": r.listener + " " + r.service, "aria-label": "route " + r.listener + " to " + r.service }, title);
      if (eps.length === 0) {
        sec.append(el("p", null, badge("bad", "✕ no healthy nodes")));
      } else {
        const rows = eps.map((e) => {
          const [kind, text] = STATES[e.state] || ["info", e.state || "unknown"];
          const lat = e.latency_ms || {};
          return el("tr", { "data-node": e.addr, "data-state": e.state },
            el("th", { scope: "row" }, el("code", null, e.addr), e.id !== e.addr ? el("div", { class: "muted" }, e.id) : null),
            el("td", null, badge(kind, text)),
            el("td", null, e.breaker + (e.consecutive_failures ? " (" + e.consecutive_failures + " failed)" : "")),
            el("td", null, e.ejected_until ? "until " + new Date(e.ejected_until).toLocaleTimeString() : "–"),
            el("td", { class: "num" }, e.weight),
            el("td", { class: "num" }, e.active_requests + (e.pending_requests ? " +" + e.pending_requests + " waiting" : "")),
            el("td", { class: "num" }, e.connections),
            el("td", { class: "num" }, num(e.requests_per_second, 1)),
            el("td", { class: "num" }, e.requests_per_second ? num(100 * e.error_rate, 1) + "%" : "–"),
            el("td", { class: "num" }, num(lat.p50, 1)),
            el("td", { class: "num" }, num(lat.p90, 1)),
            el("td", { class: "num" }, num(lat.p99, 1)));
        });
        sec.append(table("Nodes passing their Consul checks; rates and latencies over the last 10 s",
          ["Node", "State", "Breaker", "Ejected", { label: "Weight", num: 1 }, { label: "In flight", num: 1 },
            { label: "Conns", num: 1 }, { label: "Req/s", num: 1 }, { label: "Errors", num: 1 },
            { label: "p50 ms", num: 1 }, { label: "p90 ms", num: 1 }, { label: "p99 ms", num: 1 }], rows));
      }
      out.push(sec);
    }
    replace("routes", ...out);
  }

  function renderDiscovery(ws) {
    if (!ws || ws.length === 0) {
      replace("discovery", el("p", { class: "muted" }, "no service watched yet"));
      return;
    }
    const rows = ws.map((w) => {
      let state = badge("ok", "✓ fresh");
      if (w.pending) state = badge("wait", "… waiting for the first answer");
      else if (w.stale) state = badge("warn", "⚠ stale for " + duration(w.age_seconds));
      return el("tr", { "data-watch": w.service },
        el("th", { scope: "row" }, el("code", null, w.service)),
        el("td", { class: "num" }, w.endpoints),
        el("td", null, state),
        el("td", null, ago(w.confirmed)),
        el("td", null, ago(w.updated)),
        el("td", null, w.pinned ? "yes" : "no"),
        el("td", null, w.error ? badge("bad", "✕ " + w.error) : (w.acl ? badge("warn", "⚠ " + w.acl) : "–")));
    });
    replace("discovery", table(null,
      ["Service", { label: "Nodes", num: 1 }, "Set", "Confirmed", "Changed", "Pinned", "Problem"], rows));
  }

  function renderPubSub(p) {
    const card = document.getElementById("pubsub-card");
    if (!p) { card.hidden = true; return; }
    card.hidden = false;
    const groups = p.groups || [];
    if (p.broker === "nats") {
      replace("pubsub",
        kv([["Broker", "NATS JetStream"],
          ["Connection", p.connected ? badge("ok", "✓ connected to " + p.server) : badge("bad", "✕ disconnected")],
          ["Stream", p.stream], ["Spooled", p.spooled]]),
        groups.length ? table("Consumers", ["Topic", "Group", { label: "Pending", num: 1 }, { label: "In flight", num: 1 }, "Consumer", "Problem"],
          groups.map((g) => el("tr", null, el("th", { scope: "row" }, g.topic), el("td", null, g.group),
            el("td", { class: "num" }, g.pending < 0 ? "?" : g.pending), el("td", { class: "num" }, g.in_flight),
            el("td", null, el("code", null, g.consumer)), el("td", null, g.error ? badge("bad", g.error) : "–")))) : null);
      return;
    }
    replace("pubsub",
      kv([["Outbox", p.outbox + " messages"], ["Oldest pending", duration(p.oldest_pending_seconds)],
        ["Waiting for subscriptions", p.waiting_for_subscriptions || null]]),
      groups.length ? table("Lag by topic and group", ["Topic", "Group", { label: "Pending", num: 1 }, { label: "In flight", num: 1 }, { label: "Oldest", num: 1 }],
        groups.map((g) => el("tr", null, el("th", { scope: "row" }, g.topic), el("td", null, g.group),
          el("td", { class: "num" }, g.pending), el("td", { class: "num" }, g.in_flight),
          el("td", { class: "num" }, duration(g.oldest_pending_seconds))))) : null);
  }

  // --- changes between documents ---

  function note(text, kind) {
    events.unshift({ at: new Date(), text: text, kind: kind });
    events.length = Math.min(events.length, MAX_EVENTS);
    replace("events", ...events.map((e) => el("li", { class: "event-" + e.kind },
      el("time", { datetime: e.at.toISOString() }, e.at.toLocaleTimeString()), e.text)));
  }

  function nodesOf(doc) {
    const m = new Map();
    for (const r of doc.upstreams || []) {
      for (const e of r.endpoints || []) m.set(r.listener + " " + r.service + " " + e.addr, { r: r, e: e });
    }
    return m;
  }

  function diff(a, b) {
    const before = nodesOf(a), after = nodesOf(b);
    for (const [k, v] of before) {
      if (!after.has(k)) note("node " + v.e.addr + " left " + v.r.service + " (" + v.r.listener + ")", "bad");
    }
    for (const [k, v] of after) {
      const old = before.get(k);
      if (!old) note("node " + v.e.addr + " joined " + v.r.service + " (" + v.r.listener + ")", "ok");
      else if (old.e.state !== v.e.state) note("node " + v.e.addr + " of " + v.r.service + ": " + old.e.state + " → " + v.e.state, "warn");
    }
    const sa = a.service, sb = b.service;
    if (sa && sb && sa.check_status !== sb.check_status) note("check " + sa.check_status + " → " + sb.check_status, "warn");
    const aa = a.app, ab = b.app;
    if (aa && ab && (aa.state !== ab.state || aa.pid !== ab.pid)) note("app " + aa.state + " → " + ab.state + (ab.pid ? ", pid " + ab.pid : ""), "warn");
  }

  function render(doc) {
    if (prev) diff(prev, doc);
    prev = doc;
    lastUpdate = Date.now();
    uptimeAt = [doc.uptime_seconds || 0, lastUpdate];
    document.getElementById("version").textContent = doc.version || "";
    renderService(doc.service);
    renderApp(doc.app);
    renderRoutes(doc.upstreams);
    renderDiscovery(doc.discovery);
    renderPubSub(doc.pubsub);
    tick();
  }

  // --- connection ---

  function setConn(kind, text) {
    const c = document.getElementById("conn");
    c.className = "badge badge-" + kind;
    c.textContent = text;
  }

  // tick moves the clocks on between documents: the uptime, and every
  // "… ago" (the stream sends only what changed).
  function tick() {
    if (prev && Date.now() - lastUpdate > 900) {
      renderService(prev.service);
      renderApp(prev.app);
      renderDiscovery(prev.discovery);
    }
    if (uptimeAt) {
      const up = uptimeAt[0] + (Date.now() - uptimeAt[1]) / 1000;
      document.getElementById("uptime").textContent = "up " + duration(up);
    }
  }

  let polling = false;
  function poll() {
    if (polling) return;
    polling = true;
    const once = () => {
      fetch("/status", { cache: "no-store", headers: { Accept: "application/json" } })
        .then((r) => { if (!r.ok) throw new Error("status " + r.status); return r.json(); })
        .then((doc) => { render(doc); setConn("ok", "● live (polling every 0.5 s)"); })
        .catch((err) => setConn("bad", "✕ disconnected: " + err.message))
        .finally(() => setTimeout(once, POLL_MS));
    };
    once();
  }

  function stream() {
    if (!window.EventSource) { poll(); return; }
    const es = new EventSource("/status/stream");
    let failures = 0;
    es.addEventListener("status", (ev) => {
      failures = 0;
      let doc;
      try { doc = JSON.parse(ev.data); } catch (err) { setConn("bad", "✕ bad document: " + err.message); return; }
      render(doc);
      setConn("ok", "● live");
    });
    es.onerror = () => {
      failures++;
      if (failures >= 3 || es.readyState === EventSource.CLOSED) {
        es.close();
        setConn("warn", "⚠ stream lost; polling");
        poll();
      } else {
        setConn("warn", "◐ reconnecting…");
      }
    };
  }

  setInterval(tick, 1000);
  stream();
})();
