// pier dashboard: the only script. It refreshes a running deployment's page and sends
// actions; everything else is plain HTML from the server.
"use strict";

const TOKEN_KEY = "pier-dashboard-token";
const POLL_MS = 1000;

// A token handed over in the address (#token=...) is kept for this tab and taken out of
// the address bar; the fragment never reaches the server.
function takeTokenFromAddress() {
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}

function showTokenState() {
  const el = document.getElementById("token-state");
  if (el) el.textContent = sessionStorage.getItem(TOKEN_KEY) ? "token set for actions" : "";
}

// While the deployment runs, fetch its live part every second and swap it in.
let following = false;

function followDeployment() {
  const live = document.getElementById("live");
  if (!live || live.dataset.final === "true" || following) return;
  following = true;
  const id = live.dataset.id;
  const tick = async () => {
    try {
      const r = await fetch("/deployments/" + encodeURIComponent(id) + "/live", { cache: "no-store" });
      if (r.ok) {
        live.innerHTML = await r.text();
        bindActions(live);
        if (r.headers.get("x-pier-final") === "1") {
          live.dataset.final = "true";
          following = false;
          return;
        }
      }
    } catch (e) { /* the server restarting: try again */ }
    setTimeout(tick, POLL_MS);
  };
  setTimeout(tick, POLL_MS);
}

// An action: confirm in a dialog that also asks for the token (and a name to record), then
// POST with the token in a header, which a cross-site page cannot send.
function bindActions(root) {
  root.querySelectorAll("button[data-action]").forEach((b) => {
    b.addEventListener("click", () => confirmAction(b));
  });
}

function confirmAction(button) {
  const dialog = document.getElementById("confirm");
  const tokenInput = document.getElementById("confirm-token");
  const actorInput = document.getElementById("confirm-actor");
  const error = document.getElementById("confirm-error");
  document.getElementById("confirm-text").textContent = button.dataset.confirm;
  tokenInput.value = sessionStorage.getItem(TOKEN_KEY) || "";
  actorInput.value = localStorage.getItem("pier-dashboard-actor") || "";
  error.textContent = "";
  const go = document.getElementById("confirm-go");
  const onGo = async (ev) => {
    ev.preventDefault();
    const body = Object.assign({}, JSON.parse(button.dataset.body || "{}"), {
      actor: actorInput.value,
    });
    const r = await fetch(button.dataset.action, {
      method: "POST",
      headers: { "content-type": "application/json", "x-pier-token": tokenInput.value },
      body: JSON.stringify(body),
    });
    const answer = await r.json().catch(() => ({ error: r.statusText }));
    if (!r.ok) {
      error.textContent = answer.error || r.statusText;
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, tokenInput.value);
    localStorage.setItem("pier-dashboard-actor", actorInput.value);
    showTokenState();
    go.removeEventListener("click", onGo);
    dialog.close();
    const out = document.getElementById("action-result");
    if (out) out.textContent = answer.message;
    const live = document.getElementById("live");
    if (live) { live.dataset.final = "false"; followDeployment(); }
  };
  go.addEventListener("click", onGo);
  dialog.addEventListener("close", () => go.removeEventListener("click", onGo), { once: true });
  dialog.showModal();
}

takeTokenFromAddress();
showTokenState();
bindActions(document);
followDeployment();
