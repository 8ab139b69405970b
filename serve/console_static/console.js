// The review console's one script (served as a file: the Content-Security-Policy allows no
// inline script). Everything shown from the server goes in with textContent, never as HTML.
"use strict";
(function () {
  const body = document.body;
  const csrf = body.dataset.csrf;
  const $ = (id) => document.getElementById(id);

  function showError(message) {
    const el = $("error");
    el.textContent = message;
    el.hidden = !message;
  }

  async function post(url, data, headers) {
    const resp = await fetch(url, {
      method: "POST", credentials: "same-origin", cache: "no-store",
      headers: Object.assign({"Content-Type": "application/json", "X-Remed-Console": "1", "X-CSRF-Token": csrf},
                             headers || {}),
      body: JSON.stringify(data || {}),
    });
    let answer = {};
    try { answer = await resp.json(); } catch (e) { answer = {}; }
    if (!resp.ok) {
      const err = (answer && answer.error && answer.error.message) || ("the server answered " + resp.status);
      throw new Error(err);
    }
    return answer;
  }

  function busy(button, text) {
    if (button) { button.disabled = !!text; if (text) { button.dataset.label = button.textContent; button.textContent = text; }
                  else if (button.dataset.label) { button.textContent = button.dataset.label; } }
  }

  function rememberOperator(input) {
    if (!input) return;
    try {
      if (!input.value) input.value = localStorage.getItem("remed-operator") || "";
      input.addEventListener("change", () => localStorage.setItem("remed-operator", input.value));
    } catch (e) { /* storage off: no memory */ }
  }

  const logout = $("logout");
  if (logout) logout.addEventListener("click", async () => {
    try { await post("/ui/logout", {}); location.href = "/ui/login"; } catch (e) { showError(e.message); }
  });

  // ---- login
  const login = $("login");
  if (login) login.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    showError("");
    try {
      await post("/ui/login", {token: $("login-token").value});
      $("login-token").value = "";
      location.href = login.dataset.next || "/ui";
    } catch (e) { showError(e.message); }
  });

  // ---- new incident
  const propose = $("propose");
  if (propose) {
    rememberOperator($("operator"));
    $("observe").addEventListener("click", async () => {
      const sandbox = $("sandbox").value;
      showError("");
      if (!sandbox) { showError("choose a sandbox to observe"); return; }
      busy($("observe"), "observing…");
      try {
        const got = await post("/ui/api/observe", {sandbox: sandbox});
        $("report").value = JSON.stringify(got.report, null, 2);
        $("observe-status").textContent = "observed " + new Date().toLocaleTimeString();
      } catch (e) { showError(e.message); }
      busy($("observe"), "");
    });
    propose.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      showError("");
      const data = {report: $("report").value, sandbox: $("sandbox").value || null, operator: $("operator").value,
                    temperature: parseFloat($("temperature").value || "0")};
      const mt = parseInt($("max_tokens").value || "", 10);
      if (mt > 0) data.max_tokens = mt;
      if ($("answer") && $("answer").value.trim()) data.answer = $("answer").value;
      busy($("propose-button"), "the model is writing…");
      $("propose-status").textContent = "";
      try {
        const got = await post("/ui/api/propose", data);
        location.href = got.url;
      } catch (e) { showError(e.message); busy($("propose-button"), ""); }
    });
  }

  // ---- a decision
  const decision = $("decision");
  if (decision) {
    const id = decision.dataset.id;
    let polling = null;

    async function poll() {
      try {
        const resp = await fetch("/ui/api/decisions/" + id, {credentials: "same-origin", cache: "no-store"});
        if (!resp.ok) return;
        const d = await resp.json();
        const last = d.events && d.events.length ? d.events[d.events.length - 1] : null;
        $("progress").textContent = d.status === "executing"
          ? "executing in " + d.sandbox + " for " + (d.elapsed_s || 0).toFixed(0) + " s" +
            (last ? " — " + last.note : "")
          : d.status + (d.outcome ? ": " + d.outcome : "");
        $("status").textContent = d.status;
        if (d.status !== "executing" && d.status !== "proposed") {
          clearInterval(polling);
          location.reload();
        }
      } catch (e) { /* the next poll will tell */ }
    }
    function startPolling() {
      $("progress-box").hidden = false;
      if (!polling) polling = setInterval(poll, 1000);
    }
    if (decision.dataset.status === "executing") startPolling();

    const approve = $("approve");
    if (approve) {
      rememberOperator($("approve-operator"));
      approve.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        showError("");
        const token = $("approve-token").value;
        $("approve-token").value = "";
        busy($("approve-button"), "executing…");
        const running = post("/ui/api/decisions/" + id + "/approve", {operator: $("approve-operator").value},
                             {"Authorization": "Bearer " + token});
        setTimeout(startPolling, 300);
        try { await running; location.reload(); }
        catch (e) { showError(e.message); busy($("approve-button"), ""); setTimeout(poll, 500); }
      });
    }
    const reject = $("reject");
    if (reject) {
      rememberOperator($("reject-operator"));
      reject.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        showError("");
        try {
          await post("/ui/api/decisions/" + id + "/reject",
                     {operator: $("reject-operator").value, reason: $("reject-reason").value});
          location.reload();
        } catch (e) { showError(e.message); }
      });
    }
    const regen = $("regenerate");
    if (regen) regen.addEventListener("click", async () => {
      showError("");
      busy(regen, "the model is writing…");
      try {
        const got = await post("/ui/api/decisions/" + id + "/regenerate",
                               {operator: ($("reject-operator") || {}).value || ""});
        location.href = got.url;
      } catch (e) { showError(e.message); busy(regen, ""); }
    });
  }
})();
