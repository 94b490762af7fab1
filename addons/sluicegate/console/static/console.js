// sluicegate console: live regions without a framework.
// An element with data-live="<partial URL>" and data-topic="<event>" is refetched when the
// server-sent event of that topic arrives (and every 10 s as a fallback). The fresh children are
// merged by data-key: rows still present are kept as they are (an approver typing a reason keeps
// the text), new rows are inserted in order, rows gone are removed.
"use strict";

(function () {
  const pending = new Map();

  function merge(target, html) {
    const template = document.createElement("template");
    template.innerHTML = html;
    const fresh = Array.from(template.content.children);
    const current = new Map();
    for (const child of Array.from(target.children)) {
      current.set(child.dataset.key, child);
    }
    const wanted = new Set(fresh.map((child) => child.dataset.key));
    for (const [key, child] of current) {
      if (!wanted.has(key)) child.remove();
    }
    let previous = null;
    for (const child of fresh) {
      const key = child.dataset.key;
      let node = current.get(key);
      if (!node || !node.isConnected) {
        node = child;
      } else if (!node.contains(document.activeElement) && !hasInput(node)) {
        node.replaceWith(child);
        node = child;
      }
      const next = previous ? previous.nextElementSibling : target.firstElementChild;
      if (next !== node) target.insertBefore(node, next);
      previous = node;
    }
    target.dispatchEvent(new CustomEvent("live-updated", { bubbles: true }));
    tick();
  }

  function hasInput(node) {
    for (const input of node.querySelectorAll("input[type=text], input[type=number]")) {
      if (input.value) return true;
    }
    return false;
  }

  async function refresh(target) {
    if (pending.get(target)) return;
    pending.set(target, true);
    try {
      const response = await fetch(target.dataset.live, {
        credentials: "same-origin",
        headers: { "x-requested-with": "console" },
      });
      if (response.status === 401) {
        window.location.assign("/console/signin");
        return;
      }
      if (response.ok) merge(target, await response.text());
    } catch (err) {
      // the next event or the fallback poll tries again
    } finally {
      pending.set(target, false);
    }
  }

  function refreshTopic(topic) {
    for (const target of document.querySelectorAll('[data-live][data-topic="' + topic + '"]')) {
      refresh(target);
    }
  }

  function tick() {
    const now = Date.now() / 1000;
    for (const el of document.querySelectorAll("time[data-since]")) {
      const seconds = Math.max(0, Math.round(now - Number(el.dataset.since)));
      el.textContent =
        seconds < 120 ? seconds + " s" : seconds < 7200 ? Math.round(seconds / 60) + " min"
          : Math.round(seconds / 3600) + " h";
    }
  }

  function start() {
    const live = document.querySelectorAll("[data-live]");
    tick();
    setInterval(tick, 1000);
    if (!live.length) return;
    const topics = new Set(Array.from(live, (el) => el.dataset.topic));
    if (window.EventSource) {
      const events = new EventSource("/console/events");
      for (const topic of topics) {
        events.addEventListener(topic, () => refreshTopic(topic));
      }
      events.addEventListener("open", () => {
        document.body.dataset.live = "connected";
        for (const topic of topics) refreshTopic(topic);
      });
      events.addEventListener("error", () => {
        document.body.dataset.live = "reconnecting";
      });
    }
    setInterval(() => {
      for (const topic of topics) refreshTopic(topic);
    }, 10000);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
