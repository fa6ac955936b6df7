// closedloop dashboard: live updates. An element with data-live="URL" listens to the
// server-sent events at URL and puts each new step (a table row) or pending approval
// request (a card) at its top, or (the overview) replaces its rows and the tiles' figures.
// Stored text is set with textContent only, never as markup; links must stay inside /ui/.
// Without this script every page works as before (reload it).
"use strict";

(function () {
  var MAX_ROWS = 500;

  function safeClass(text) {
    return /^[a-z0-9 _-]*$/i.test(text || "") ? text || "" : "";
  }

  function safeHref(text) {
    return typeof text === "string" && text.indexOf("/ui/") === 0 ? text : null;
  }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = safeClass(cls);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  var SVG = "http://www.w3.org/2000/svg";

  function spark(points, kind) {
    if (typeof points !== "string" || !/^[0-9., -]+$/.test(points)) return el("span", "muted", "\u2013");
    var svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "spark " + safeClass(kind));
    svg.setAttribute("viewBox", "0 0 96 20");
    svg.setAttribute("width", "96");
    svg.setAttribute("height", "20");
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", "daily trend");
    var line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", points);
    svg.appendChild(line);
    return svg;
  }

  function stepRow(data, fresh) {
    var tr = el("tr", fresh === false ? null : "live-new");
    (data.cells || []).forEach(function (cell) {
      var td = el("td", cell["class"]);
      if (typeof cell.title === "string" && cell.title) td.setAttribute("title", cell.title);
      var href = safeHref(cell.href);
      if (cell.spark !== undefined) {
        td.appendChild(spark(cell.spark, cell.kind));
      } else if (href) {
        var a = el("a", "mono", cell.text);
        a.setAttribute("href", href);
        td.appendChild(a);
      } else if (cell.badge !== undefined) {
        td.appendChild(el("span", "badge " + safeClass(cell.badge), cell.text));
      } else {
        if (cell.strong) {
          td.appendChild(el("b", null, cell.strong));
          td.appendChild(document.createTextNode(" "));
        }
        td.appendChild(document.createTextNode(String(cell.text || "")));
      }
      tr.appendChild(td);
    });
    return tr;
  }

  function requestCard(data) {
    var card = el("article", "card request live-new" + (data.destructive ? " destructive" : ""));
    var h3 = el("h3");
    var href = safeHref(data.href);
    var title = el("a", null, data.task_type);
    if (href) title.setAttribute("href", href);
    h3.appendChild(title);
    h3.appendChild(document.createTextNode(" "));
    h3.appendChild(el("span", "muted", data.asked));
    card.appendChild(h3);
    if (data.risk || data.destructive) {
      var risk = el("p", "risk");
      if (data.destructive) {
        risk.appendChild(el("b", null, "Destructive:"));
        risk.appendChild(document.createTextNode(" "));
      }
      risk.appendChild(document.createTextNode(String(data.risk || "")));
      card.appendChild(risk);
    }
    card.appendChild(el("pre", "content short", data.proposal));
    if (href) {
      var p = el("p");
      var review = el("a", "button", "Review \u2192");
      review.setAttribute("href", href);
      p.appendChild(review);
      card.appendChild(p);
    }
    return card;
  }

  function overview(box, data) {
    var tiles = data.tiles || {};
    Object.keys(tiles).forEach(function (name) {
      Array.prototype.forEach.call(document.querySelectorAll("[data-field]"), function (node) {
        if (node.getAttribute("data-field") === name) node.textContent = String(tiles[name]);
      });
    });
    Array.prototype.forEach.call(document.querySelectorAll('[data-field="trend"]'), function (node) {
      node.textContent = String(data.trend || "");
    });
    while (box.firstChild) box.removeChild(box.firstChild);
    (data.rows || []).forEach(function (row) { box.appendChild(stepRow(row, false)); });
    var table = document.querySelector("[data-live-table]");
    var empty = document.querySelector("[data-live-empty]");
    var any = (data.rows || []).length > 0;
    if (table) table.hidden = !any;
    if (empty) empty.hidden = any;
  }

  function start(box) {
    var url = box.getAttribute("data-live");
    var kind = box.getAttribute("data-live-kind");
    if (!url || url.indexOf("/ui/live/") !== 0 || !window.EventSource) return;
    var status = document.querySelector("[data-live-status]");
    var count = document.querySelector("[data-live-count]");
    function say(text) {
      if (!status) return;
      status.hidden = false;
      status.textContent = text;
    }
    var source = new EventSource(url);
    source.addEventListener("open", function () {
      say(kind === "overview" ? "Live: these figures update as steps arrive."
        : "Live: new " + kind + "s appear here.");
    });
    source.addEventListener("error", function () {
      if (source.readyState === EventSource.CLOSED) say("Live updates stopped: reload the page.");
      else say("Live updates paused: reconnecting\u2026");
    });
    source.addEventListener(kind, function (message) {
      var data;
      try { data = JSON.parse(message.data); } catch (e) { return; }
      if (kind === "overview") { overview(box, data); return; }
      var node = kind === "step" ? stepRow(data) : requestCard(data);
      box.insertBefore(node, box.firstChild);
      while (box.children.length > MAX_ROWS) box.removeChild(box.lastChild);
      var empty = document.querySelector("[data-live-empty]");
      if (empty) empty.hidden = true;
      if (count) count.textContent = String((parseInt(count.textContent, 10) || 0) + 1);
    });
    window.addEventListener("pagehide", function () { source.close(); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    Array.prototype.forEach.call(document.querySelectorAll("[data-live]"), start);
  });
})();
