// sitepair dashboard: the little the pages do in the browser (no inline script: the CSP forbids it).
// 1. Times: every <time datetime="...Z"> is shown in the browser's time zone; UTC stays in title.
// 2. Jobs: a running job's #job[data-events] follows its server-sent events; each event's data is
//    the re-rendered #job, swapped in place; the stream is closed when the job is final.
"use strict";

(function () {
  var FINAL = ["succeeded", "failed", "cancelled"];

  function localTimes(root) {
    var times = root.querySelectorAll("time[datetime]");
    for (var i = 0; i < times.length; i++) {
      var el = times[i];
      var when = new Date(el.getAttribute("datetime"));
      if (isNaN(when.getTime())) continue;
      el.textContent = when.toLocaleString(undefined, {
        year: "numeric", month: "short", day: "numeric",
        hour: "2-digit", minute: "2-digit", second: "2-digit", timeZoneName: "short"
      });
    }
  }

  function followJob() {
    var job = document.getElementById("job");
    if (!job || !job.dataset.events || !window.EventSource) return;
    var source = new EventSource(job.dataset.events);
    source.addEventListener("job", function (event) {
      var template = document.createElement("template");
      template.innerHTML = event.data;  // our own server's HTML, escaped by its templates
      var fresh = template.content.getElementById("job");
      var current = document.getElementById("job");
      if (!fresh || !current) return;
      current.replaceWith(fresh);
      localTimes(fresh);
      if (FINAL.indexOf(fresh.dataset.state) >= 0) source.close();
    });
    source.addEventListener("failure", function () { source.close(); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    localTimes(document);
    followJob();
  });
  // Tables htmx swapped in (the VM list every 5 s).
  document.addEventListener("htmx:afterSwap", function (event) { localTimes(event.target); });
  document.addEventListener("htmx:afterSettle", function () { localTimes(document); });
})();
