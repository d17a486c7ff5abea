/* composer's client signals collector (SPEC §7): what each fragment does in the browser.
 *
 * Loaded first in <head> (after Google's web-vitals, in the same file), before any fragment
 * markup is parsed, so errors thrown while the page is still parsing are caught. Nothing on
 * the page is wrapped: composer marks each fragment's markup with two comments,
 * <!--composer:N--> and <!--/composer:N-->, and lists in a JSON block at the end of the page
 * (<script type="application/json" id="composer-signals">) the page's route, request id,
 * sample rate, fragment N's [id, version], and which fragment declared each asset URL.
 * Attribution happens when the beacon is built, when that block is there.
 */
(function () {
  "use strict";
  var MAX_ERRORS = 20, MAX_TEXT = 300;
  var errors = [], vitals = {}, data = null;
  var loadedAt = document.currentScript;

  // The page's JSON block; null while the page is still loading without it (whole), so that
  // a page hidden mid-load keeps what it saw for a later beacon; false if it is unusable.
  function page() {
    if (data === null) {
      var el = document.getElementById("composer-signals"), loading = document.readyState === "loading";
      if (!el && loading) return null;
      try { data = el ? JSON.parse(el.textContent) : false; } catch (e) { if (loading) return null; data = false; }
    }
    return data;
  }

  // The index of the fragment whose markup holds `node` (-1: none): the nearest enclosing pair
  // of marker comments, found walking back through earlier siblings, then the parent's.
  function holder(node) {
    var closed = 0;
    for (var n = node; n && n !== document; n = n.parentNode) {
      for (var s = n.previousSibling; s; s = s.previousSibling) {
        if (s.nodeType !== 8) continue;
        var text = s.data;
        if (text.lastIndexOf("/composer:", 0) === 0) closed++;
        else if (text.lastIndexOf("composer:", 0) === 0) {
          if (closed === 0) return +text.slice(9);
          closed--;
        }
      }
    }
    return -1;
  }

  function target(el) {
    var i = el ? holder(el) : -1;
    return i < 0 ? "page" : String(i);
  }

  function cut(text) {
    text = String(text == null ? "" : text);
    return text.length > MAX_TEXT ? text.slice(0, MAX_TEXT) : text;
  }

  function note(kind, message, source, at, stack) {
    if (errors.length < MAX_ERRORS) errors.push({k: kind, m: cut(message), s: cut(source), i: at, t: stack || ""});
  }

  // Uncaught errors, and (capture phase) stylesheets, scripts and images that fail to load.
  addEventListener("error", function (ev) {
    var el = ev.target;
    if (el && el !== window && el.nodeType === 1) {
      var url = el.currentSrc || el.src || el.href || "";
      note("asset", el.tagName.toLowerCase() + " failed to load", url, holder(el));
      return;
    }
    var current = document.currentScript;
    var at = current && current !== loadedAt && !current.src ? holder(current) : -1;  // an inline script
    var source = ev.filename || (current && current.src) || "";
    note("error", ev.message || (ev.error && ev.error.message), source, at, ev.error && ev.error.stack);
  }, true);

  addEventListener("unhandledrejection", function (ev) {
    var r = ev.reason;
    note("rejection", r && r.message ? r.message : r, "", -1, r && r.stack);
  });

  if (window.webVitals) {
    var options = {generateTarget: target};
    var keep = function (name, value, where) { vitals[name] = [name, value, where]; };
    webVitals.onLCP(function (m) { keep("LCP", m.value, m.attribution.target); }, options);
    // INP with every change: web-vitals processes interactions when the browser is idle, and on
    // `hidden` runs its final report before that pending work, so an interaction followed by
    // leaving the page within the idle timeout (1 s) would never be reported. Only the latest
    // value is kept and sent, at the beacon, as for the others.
    webVitals.onINP(function (m) { keep("INP", m.value, m.attribution.interactionTarget); },
                    {generateTarget: target, reportAllChanges: true});
    webVitals.onCLS(function (m) { keep("CLS", m.value, m.attribution.largestShiftTarget); }, options);
    webVitals.onFCP(function (m) { keep("FCP", m.value, "page"); });
    webVitals.onTTFB(function (m) { keep("TTFB", m.value, "page"); });
  }

  // The asset URLs fragments declared, as the browser resolves them (what error events and
  // stacks name): a root-relative `/x.js` is `https://page.origin/x.js` there.
  function resolved(d) {
    if (!d.resolved) {
      var out = {}, assets = d.a || {};
      for (var url in assets) {
        if (!assets.hasOwnProperty(url)) continue;
        try { out[new URL(url, document.baseURI).href] = assets[url]; } catch (e) { /* not a URL */ }
      }
      d.resolved = out;
    }
    return d.resolved;
  }

  function declared(url, assets) {
    try { url = new URL(url, document.baseURI).href; } catch (e) { return -1; }
    return assets.hasOwnProperty(url) ? assets[url] : -1;
  }

  // The fragment an error belongs to: its inline script's, else the one whose asset threw it
  // (the script's URL, or the first URL in its stack that a fragment declared).
  function blame(e, d) {
    if (e.i >= 0) return e.i;
    var assets = resolved(d), at = e.s ? declared(e.s, assets) : -1;
    if (at >= 0) return at;
    var urls = (e.t || "").match(/(https?:\/\/|\/)[^\s)]+?(?=:\d+:\d+|\s|\)|$)/g) || [];
    for (var j = 0; j < urls.length && at < 0; j++) at = declared(urls[j], assets);
    return at;
  }

  function named(i, d) {
    var f = i >= 0 && d.f[i];
    return f ? f : ["page", ""];
  }

  var sampled = null;  // settings.client_signals_sample, decided once per page

  function flush() {
    var d = page();
    if (d === null) return;  // not there yet: keep everything for the next beacon
    if (d && sampled === null) sampled = Math.random() < (d.sample == null ? 1 : d.sample);
    if (!d || !sampled) { errors = []; vitals = {}; return; }
    var out = {route: d.route, id: d.id, e: [], v: []};
    for (var j = 0; j < errors.length; j++) {
      var f = named(blame(errors[j], d), d);
      out.e.push([f[0], f[1], errors[j].k, errors[j].m, errors[j].s]);
    }
    for (var name in vitals) {
      var v = vitals[name], where = v[2] === "page" || v[2] == null ? "page" : named(+v[2], d)[0];
      out.v.push([name, v[1], where]);
    }
    errors = []; vitals = {};
    if ((out.e.length || out.v.length) && navigator.sendBeacon) {
      navigator.sendBeacon(d.beacon || "/_composer/signals", JSON.stringify(out));
    }
  }

  // Async fragments (SPEC §3), without an inline script: composer ends each one's hidden
  // carrier with <template data-composer-move="N">, and this moves the carrier's content to
  // placeholder N (or drops the placeholder when nothing came), as soon as the parser has it.
  function move(n) {
    var p = document.getElementById("composer-async-" + n);
    var c = document.getElementById("composer-async-" + n + "-content");
    if (p) {
      if (c) while (c.firstChild) p.parentNode.insertBefore(c.firstChild, p);
      p.remove();
    }
    if (c) c.remove();
  }
  function moveAll(root) {
    var marks = root.querySelectorAll("template[data-composer-move]");
    for (var j = 0; j < marks.length; j++) {
      move(marks[j].getAttribute("data-composer-move"));
      marks[j].remove();
    }
  }
  var watching = null;
  var observer = new MutationObserver(function () {
    if (!watching && document.body) {
      watching = document.body;
      observer.observe(watching, {childList: true});
    }
    if (watching) moveAll(watching);
  });
  observer.observe(document.documentElement, {childList: true});
  document.addEventListener("DOMContentLoaded", function () { moveAll(document); });

  addEventListener("visibilitychange", function () {
    if (document.visibilityState === "hidden") flush();
  });
  addEventListener("pagehide", flush);
})();
