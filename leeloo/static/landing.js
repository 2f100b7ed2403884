// The landing page's live counts: /health every 15 seconds (and when the
// page comes back into view).  The page reads fine without this script.
"use strict";
(function () {
  var EVERY = 15000;
  var state = document.getElementById("relay-state");

  function refresh() {
    return fetch("/health", { cache: "no-store" })
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      })
      .then(function (health) {
        var fields = document.querySelectorAll("[data-field]");
        for (var i = 0; i < fields.length; i++) {
          var value = health[fields[i].getAttribute("data-field")];
          if (typeof value === "number") fields[i].textContent = String(value);
        }
        state.textContent = "Relay online";
      })
      .catch(function () {
        state.textContent = "Relay not answering";
      });
  }

  setInterval(function () { if (!document.hidden) refresh(); }, EVERY);
  document.addEventListener("visibilitychange", function () { if (!document.hidden) refresh(); });
  window.leelooLanding = { refresh: refresh };
})();
