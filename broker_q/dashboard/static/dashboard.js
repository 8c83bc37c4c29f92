// broker_q dashboard: live updates, and "select all" for dead letters. Pages work without it.
"use strict";

(function () {
  // Every element with data-live is replaced, every few seconds, by the element of the same id in
  // a fresh copy of the page; one that holds the focused field is left alone, so typing is never lost.
  const toggle = document.getElementById("live-toggle");
  const status = document.getElementById("live-status");
  const regions = () => Array.from(document.querySelectorAll("[data-live][id]"));
  if (toggle && regions().length) {
    const interval = Number(toggle.dataset.interval) || 3000;
    let on = true;
    let timer = null;
    const busy = (region) => {
      const active = document.activeElement;
      return active && region.contains(active) && /^(INPUT|TEXTAREA|SELECT)$/.test(active.tagName);
    };
    const refresh = async () => {
      try {
        const response = await fetch(location.href, { headers: { "X-Live-Update": "1" }, credentials: "same-origin" });
        if (response.status === 401) { location.reload(); return; }
        if (!response.ok) { status.textContent = "update failed (" + response.status + "), retrying"; return; }
        const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
        for (const region of regions()) {
          const next = fresh.getElementById(region.id);
          if (next && next.innerHTML !== region.innerHTML && !busy(region)) {
            region.innerHTML = next.innerHTML;
            wire(region);
          }
        }
        status.textContent = "updated " + new Date().toLocaleTimeString([], { hour12: false });
      } catch (error) {
        status.textContent = "offline, retrying";
      } finally {
        if (on) timer = setTimeout(refresh, interval);
      }
    };
    toggle.addEventListener("click", () => {
      on = !on;
      toggle.setAttribute("aria-pressed", String(on));
      toggle.textContent = "Live: " + (on ? "on" : "paused");
      clearTimeout(timer);
      if (on) refresh();
    });
    timer = setTimeout(refresh, interval);
  }

  // A header checkbox selects every row of its group.
  function wire(root) {
    for (const all of root.querySelectorAll("[data-select-all]")) {
      all.addEventListener("change", () => {
        for (const box of document.querySelectorAll('[data-group="' + all.dataset.selectAll + '"]')) {
          box.checked = all.checked;
        }
      });
    }
  }
  wire(document);
})();
