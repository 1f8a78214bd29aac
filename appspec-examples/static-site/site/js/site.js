// Shows when the page was loaded, so a reload after a deployment is visible.
document.addEventListener("DOMContentLoaded", function () {
  var el = document.getElementById("loaded");
  if (el) { el.textContent = new Date().toISOString(); }
});
