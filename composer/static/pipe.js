/* composer's runtime for Tailor's client protocol (settings.compat: tailor), inlined into each
   page as `var <pipe_instance_name>=…`. Not Tailor's src/pipe.js; the same API (docs/hooks.md):
   placeholder/start/end calls written by composer around each fragment, fragment scripts
   loaded with the page's AMD loader and their export called with the fragment's root element
   (a returned promise is waited for), loadCSS, the four hooks (onStart, onBeforeInit and
   onAfterInit take one callback each, as in Tailor; onDone any number, run in order, once)
   and custom performance entries. Everything above this line is left out of pages. */
(function (doc, perf) {
  var placeholders = {}, starts = {}, pending = 0, done = false, entries = [], doneHooks = [];
  var noop = function () {};
  var hooks = {onStart: noop, onBeforeInit: noop, onAfterInit: noop};

  function current() {
    var script = doc.currentScript, all;
    if (!script) {
      all = doc.querySelectorAll("script[data-pipe]");
      script = all[all.length - 1];
    }
    if (script) script.removeAttribute("data-pipe");
    return script;
  }

  function fireDone() {
    if (done || pending > 0 || doc.readyState === "loading") return;
    done = true;
    for (var i = 0; i < doneHooks.length; i++) doneHooks[i]();
  }

  function start(index, script, attributes) {
    starts[index] = current();
    if (script) {
      pending++;
      hooks.onStart(attributes, index);
      require([script]);
    }
  }

  function rootOf(from, to) {
    var node = from.nextSibling;
    while (node && node.nodeType !== 1) node = node.nextSibling;
    return node === to ? undefined : node;
  }

  function init(module, node, attributes, index) {
    var fn = module && module.__esModule ? module.default : module, result;
    var finish = function () {
      pending--;
      hooks.onAfterInit(attributes, index);
      fireDone();
    };
    hooks.onBeforeInit(attributes, index);
    if (typeof fn !== "function") return finish();
    try {
      result = fn(node);
    } catch (error) {
      finish();
      throw error;
    }
    if (result && typeof result.then === "function") result.then(finish, finish);
    else finish();
  }

  function end(index, script, attributes) {
    var first = starts[index], last = current(), slot = placeholders[index], node, next = first;
    if (!first || !last) return;
    if (slot) {
      do {
        node = next;
        next = node.nextSibling;
        slot.parentNode.insertBefore(node, slot);
      } while (node !== last && next);
      slot.parentNode.removeChild(slot);
    }
    node = rootOf(first, last);
    first.parentNode.removeChild(first);
    last.parentNode.removeChild(last);
    if (script) {
      require([script], function (module) { init(module, node, attributes, index); });
    }
  }

  function loadCSS(href) {
    var link = doc.createElement("link");
    link.rel = "stylesheet";
    link.href = href;
    link.media = "only x";  // fetched without blocking rendering, then applied
    link.onload = function () { link.onload = null; link.media = "all"; };
    (doc.body || doc.getElementsByTagName("head")[0]).appendChild(link);
    return link;
  }

  function addPerfEntry(name, duration) {
    entries.push({name: name, duration: Number(duration), entryType: "tailor",
                  startTime: perf && perf.now ? perf.now() : 0});
  }

  function hook(name) {
    return function (callback) { hooks[name] = callback; };
  }

  doc.addEventListener("DOMContentLoaded", fireDone);
  return {
    placeholder: function (index) { placeholders[index] = current(); },
    start: start,
    end: end,
    loadCSS: loadCSS,
    onStart: hook("onStart"),
    onBeforeInit: hook("onBeforeInit"),
    onAfterInit: hook("onAfterInit"),
    onDone: function (callback) { doneHooks.push(callback); },
    addPerfEntry: addPerfEntry,
    addTTFMPEntry: function (duration) { addPerfEntry("ttfmp", duration); },
    getEntries: function () { return entries; }
  };
})(window.document, window.performance)
