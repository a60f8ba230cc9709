// circuitctl circuit viewer: reads the embedded payload, lays nodes out by layer (input at the
// bottom, logits on top, one column per position for per-position circuits) and draws only the
// selected edges. Every name reaches the page through textContent / setAttribute, never as HTML.
(function () {
  "use strict";

  var SVGNS = "http://www.w3.org/2000/svg";
  var CHANNELS = [null, "q", "k", "v"];
  var CHANNEL_COLOUR = { q: "#7b3294", k: "#1a9641", v: "#e66101" };
  var POSITIVE = "#2c5d8f", NEGATIVE = "#c0392b", NEUTRAL = "#8a8a8a";
  var KIND_FILL = { input: "#dddddd", logits: "#dddddd", head: "#cfe2f3", mlp: "#fde9c9", kv_group: "#e8f4e1",
    neuron: "#fde9c9", feature: "#cfe2f3", error: "#eeeeee" };
  var SITE_FILL = { embed: "#dddddd", attn: "#d9ead3", mlp: "#fde9c9", resid: "#cfe2f3" };
  var KIND_ORDER = { input: 0, head: 1, kv_group: 2, mlp: 3, neuron: 4, feature: 5, error: 6, logits: 7 };
  var GROUP_PALETTE = ["#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5", "#bc80bd", "#ccebc5"];
  var MAX_DRAWN = 5000;  // beyond this the page draws the strongest selected edges and says so
  var TYPES = ["q", "k", "v", "mlp", "logits", "other"];

  function $(id) { return document.getElementById(id); }
  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    for (var key in attrs || {}) node.setAttribute(key, attrs[key]);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function svg(tag, attrs, text) {
    var node = document.createElementNS(SVGNS, tag);
    for (var key in attrs || {}) node.setAttribute(key, attrs[key]);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function fmt(x) {
    if (x === null || x === undefined) return "\u2014";
    if (typeof x !== "number") return String(x);
    if (x === 0) return "0";
    var a = Math.abs(x);
    if (a >= 1e5 || a < 1e-3) return x.toExponential(3);
    return String(Number(x.toPrecision(4)));
  }

  function floorDigits(x) {  // x rounded down to 4 significant digits: typed back as a threshold it keeps at least these units
    if (x === 0 || !isFinite(x)) return String(x);
    var step = Math.pow(10, Math.floor(Math.log10(Math.abs(x))) - 3);
    return String(Number((Math.floor(x / step) * step).toPrecision(4)));
  }

  // ---------------------------------------------------------------- data
  var raw = JSON.parse($("circuit-data").textContent);
  var meta = raw.meta;
  var nodes = raw.nodes.id.map(function (id, i) {
    return { i: i, id: id, kind: raw.nodes.kind[i], layer: raw.nodes.layer[i], column: raw.nodes.column[i],
      score: raw.nodes.score[i], inCircuit: raw.nodes["in"][i] === 1, label: raw.nodes.label[i], feeds: raw.nodes.feeds[i] || [] };
  });
  var E = raw.edges, nE = E.s.length, nN = nodes.length;
  var edgeType = new Uint8Array(nE);  // index into TYPES
  var inEdges = nodes.map(function () { return []; }), outEdges = nodes.map(function () { return []; });
  for (var e = 0; e < nE; e++) {
    var target = nodes[E.t[e]];
    edgeType[e] = E.c[e] ? E.c[e] - 1 : target.kind === "mlp" ? 3 : target.kind === "logits" ? 4 : 5;
    inEdges[E.t[e]].push(e);
    outEdges[E.s[e]].push(e);
  }
  function edgeInput(e) {
    var name = E.input[e];
    if (name !== undefined) return name;
    var channel = CHANNELS[E.c[e]];
    return nodes[E.t[e]].id + (channel ? "<" + channel + ">" : "");
  }
  function edgeName(e) { return nodes[E.s[e]].id + "->" + edgeInput(e); }

  var explanation = meta.explanation && typeof meta.explanation === "object" ? meta.explanation : null;
  var explained = explanation && explanation.nodes && typeof explanation.nodes === "object" ? explanation.nodes : {};
  var groups = explanation && Array.isArray(explanation.groups) ? explanation.groups.filter(function (g) {
    return g && Array.isArray(g.members) && g.members.length > 0;
  }) : [];
  function baseId(id) { var at = id.indexOf("@"); return at < 0 ? id : id.slice(0, at); }
  function explanationOf(node) {
    var entry = Object.prototype.hasOwnProperty.call(explained, node.id) ? explained[node.id] : explained[baseId(node.id)];
    return entry && typeof entry === "object" ? entry : null;
  }
  var groupIndexOf = {};  // member base id -> index into groups
  groups.forEach(function (g, gi) { g.members.forEach(function (m) { groupIndexOf[String(m)] = gi; }); });
  function groupOf(node) {
    var gi = groupIndexOf[node.id];
    if (gi === undefined) gi = groupIndexOf[baseId(node.id)];
    return gi === undefined ? -1 : gi;
  }

  // ---------------------------------------------------------------- ranking
  var rankedEdges = meta.ranked === "edges";
  var unitName = String((meta.circuit || {}).unit || (rankedEdges ? "edges" : "nodes"));  // edges, nodes, neurons or features
  var units = [];
  if (rankedEdges) { for (e = 0; e < nE; e++) if (E.w[e] !== null) units.push(e); }
  else { nodes.forEach(function (n) { if (n.score !== null) units.push(n.i); }); }
  function unitScore(u) { return rankedEdges ? E.w[u] : nodes[u].score; }
  function ordered(key) {  // by key descending; ties keep payload order, as Python's stable sort does
    return units.slice().sort(function (a, b) { return key(unitScore(b)) - key(unitScore(a)) || a - b; });
  }
  var orders = { abs: ordered(Math.abs), signed: ordered(function (x) { return x; }) };
  var recordedUnits = units.filter(function (u) { return rankedEdges ? E.m[u] === 1 : nodes[u].inCircuit; });

  var circuit = meta.circuit || {};
  var state = {
    recorded: true, n: recordedUnits.length, absolute: circuit.absolute !== false, prune: !!circuit.prune,
    show: { q: true, k: true, v: true, mlp: true, logits: true, other: true },
    grouped: false, colourBy: groups.length ? "group" : "kind", chosen: null, search: ""
  };

  function rankKey(x) { return state.absolute ? Math.abs(x) : x; }

  function treeShake(selected) {
    // keep edges on some path from an input node to a logits node (circuitctl's prune)
    var fwd = new Uint8Array(nN), bwd = new Uint8Array(nN), out = nodes.map(function () { return []; }), inn = nodes.map(function () { return []; });
    for (var e = 0; e < nE; e++) if (selected[e]) { out[E.s[e]].push(E.t[e]); inn[E.t[e]].push(E.s[e]); }
    nodes.forEach(function (n) { n.feeds.forEach(function (h) { out[n.i].push(h); inn[h].push(n.i); }); });
    function flood(mark, next, kind) {
      var stack = [];
      nodes.forEach(function (n) { if (n.kind === kind) { mark[n.i] = 1; stack.push(n.i); } });
      while (stack.length) { var v = stack.pop(); next[v].forEach(function (w) { if (!mark[w]) { mark[w] = 1; stack.push(w); } }); }
    }
    flood(fwd, out, "input");
    flood(bwd, inn, "logits");
    var kept = new Uint8Array(nE);
    for (e = 0; e < nE; e++) {
      var s = E.s[e], t = E.t[e];
      kept[e] = selected[e] && fwd[s] && bwd[s] && fwd[t] && bwd[t] ? 1 : 0;
    }
    return kept;
  }

  function computeSelection() {
    var chosenUnits = state.recorded ? recordedUnits : orders[state.absolute ? "abs" : "signed"].slice(0, state.n);
    var edgeSel = new Uint8Array(nE), nodeSel = new Uint8Array(nN), nUnits;
    if (rankedEdges) {
      chosenUnits.forEach(function (u) { edgeSel[u] = 1; });
      if (state.prune && !state.recorded) edgeSel = treeShake(edgeSel);
      nUnits = 0;
      for (var e = 0; e < nE; e++) if (edgeSel[e]) { nUnits++; nodeSel[E.s[e]] = 1; nodeSel[E.t[e]] = 1; }
    } else {
      chosenUnits.forEach(function (u) { nodeSel[u] = 1; });
      nodes.forEach(function (n) { if (n.score === null) nodeSel[n.i] = 1; });
      for (e = 0; e < nE; e++) edgeSel[e] = state.recorded ? E.m[e] : (nodeSel[E.s[e]] && nodeSel[E.t[e]] ? 1 : 0);
      nUnits = chosenUnits.length;
    }
    return { edgeSel: edgeSel, nodeSel: nodeSel, nUnits: nUnits };
  }

  // ---------------------------------------------------------------- layout
  var hasColumns = Array.isArray(meta.columns) && meta.columns.length > 0;
  var columns = hasColumns ? meta.columns.map(String) : [null];
  var columnIndex = new Map(columns.map(function (c, i) { return [c, i]; }));
  nodes.forEach(function (n) {  // a node without a position in a per-position circuit gets a column of its own
    var c = hasColumns ? (n.column === null ? "" : String(n.column)) : null;
    if (!columnIndex.has(c)) { columnIndex.set(c, columns.length); columns.push(c); }
    n.col = columnIndex.get(c);
  });
  // an MLP sits half a row above its layer's heads, so head -> MLP edges of one layer point upwards
  nodes.forEach(function (n) { n.row = n.kind === "mlp" && Number.isInteger(n.layer) ? n.layer + 0.5 : n.layer; });
  var rows = Array.from(new Set(nodes.map(function (n) { return n.row; }))).sort(function (a, b) { return a - b; });
  var rowIndex = new Map(rows.map(function (r, i) { return [r, i]; }));
  var canvas = $("canvas");
  var dotMode = nN > 400;  // many nodes: small circles, names on hover
  var NODE_W = dotMode ? 10 : hasColumns ? 50 : 64, NODE_H = dotMode ? 10 : 22, STEP_X = NODE_W + (dotMode ? 4 : 8);
  var LINE_H = dotMode ? 15 : 32, ROW_GAP = dotMode || rows.length > 12 ? 28 : 46;
  var LEFT = 84, TOP = hasColumns ? 44 : 20, COLUMN_GAP = 24, BOTTOM = 20;
  // rows of heads stay on one line; rows of many neurons or features wrap to the canvas width
  var manyPerRow = meta.kind === "neuron" || meta.kind === "feature";
  var WRAP = manyPerRow ? Math.max(4, Math.floor((canvas.clientWidth - LEFT - 30 - (columns.length - 1) * COLUMN_GAP) / columns.length / STEP_X)) : 100000;

  var cells = {};
  nodes.forEach(function (n) {
    var key = rowIndex.get(n.row) + "|" + n.col;
    (cells[key] = cells[key] || []).push(n);
  });
  var collator = new Intl.Collator("en", { numeric: true });
  var columnWidth = columns.map(function () { return STEP_X; }), rowLines = rows.map(function () { return 1; });
  Object.keys(cells).forEach(function (key) {
    var parts = key.split("|"), r = +parts[0], c = +parts[1], cell = cells[key];
    cell.sort(function (a, b) { return (KIND_ORDER[a.kind] || 0) - (KIND_ORDER[b.kind] || 0) || collator.compare(a.id, b.id); });
    columnWidth[c] = Math.max(columnWidth[c], Math.min(cell.length, WRAP) * STEP_X);
    rowLines[r] = Math.max(rowLines[r], Math.ceil(cell.length / WRAP));
  });
  var columnX = [], x0 = LEFT;
  columns.forEach(function (c, i) { columnX.push(x0); x0 += columnWidth[i] + COLUMN_GAP; });
  var width = x0 + 10;
  var rowY = [], height = TOP + BOTTOM;
  rows.forEach(function (r, i) { height += rowLines[i] * LINE_H + ROW_GAP; });
  var yCursor = height - BOTTOM;
  rows.forEach(function (r, i) { rowY.push(yCursor - NODE_H / 2 - 6); yCursor -= rowLines[i] * LINE_H + ROW_GAP; });
  function placeCell(items, r, c) {  // centre a cell's items (group nodes take two slots) in its column
    var slots = 0;
    items.forEach(function (item) { slots += item.slots || 1; });
    var perLine = Math.min(slots, WRAP), k = 0;
    var offset = (columnWidth[c] - perLine * STEP_X) / 2;
    items.forEach(function (item) {
      var size = item.slots || 1;
      if (k % WRAP + size > WRAP && k % WRAP) k += WRAP - k % WRAP;
      var line = Math.floor(k / WRAP), slot = k % WRAP;
      item.x = columnX[c] + offset + (slot + size / 2) * STEP_X;
      item.y = rowY[r] - line * LINE_H;
      k += size;
    });
  }
  Object.keys(cells).forEach(function (key) {
    var parts = key.split("|");
    placeCell(cells[key], +parts[0], +parts[1]);
    cells[key].forEach(function (n, rank) { n.x0 = n.x; n.y0 = n.y; n.rank = rank; n.r = +parts[0]; });
  });

  function rowLabel(row) {
    if (row === -1) return meta.kind === "feature" ? "embed" : "input";
    if (row === meta.n_layers) return "logits";
    if (Number.isInteger(row) && meta.kind !== "feature") return "layer " + row;
    var names = new Set();
    nodes.forEach(function (n) { if (n.row === row) names.add(n.kind === "mlp" ? "MLP " + n.layer : n.id.split("/")[0]); });
    return Array.from(names).join(" ");
  }
  function shortLabel(node) {
    var text = node.column !== null ? baseId(node.id) : node.id;
    if (node.kind === "feature" || node.kind === "error") text = text.slice(text.indexOf("/") + 1);
    return text.length > 9 ? text.slice(0, 8) + "\u2026" : text;
  }
  function nodeFill(node) {
    if (state.colourBy === "group") {
      var gi = groupOf(node);
      if (gi >= 0) return GROUP_PALETTE[gi % GROUP_PALETTE.length];
    }
    if (node.kind === "feature") { var site = node.id.replace(/\d.*$/, ""); return SITE_FILL[site] || KIND_FILL.feature; }
    return KIND_FILL[node.kind] || "#eeeeee";
  }

  // ---------------------------------------------------------------- drawing
  var graph = $("graph");
  // fit the canvas width (0.5x to 1.8x; never enlarged past the canvas height); tall graphs scroll
  var fitZoom = Math.max(0.5, Math.min(1.8, (canvas.clientWidth - 12) / width, Math.max(1, (canvas.clientHeight - 12) / height)));
  function setZoom(zoom) {
    zoom = Math.max(0.2, Math.min(4, zoom));
    graph.setAttribute("width", Math.round(width * zoom));
    graph.setAttribute("height", Math.round(height * zoom));
    graph.setAttribute("data-zoom", zoom.toFixed(3));
  }
  setZoom(fitZoom);
  graph.setAttribute("viewBox", "0 0 " + width + " " + height);
  var background = svg("g", { "class": "background" }), edgeLayer = svg("g", { "class": "edges" });
  var nodeLayer = svg("g", { "class": "nodes" }), groupLayer = svg("g", { "class": "groups" });
  graph.appendChild(background); graph.appendChild(edgeLayer); graph.appendChild(nodeLayer); graph.appendChild(groupLayer);

  if (hasColumns) {
    columns.forEach(function (c, i) {
      background.appendChild(svg("rect", { "class": "column-band", x: columnX[i] - 6, y: TOP - 24, width: columnWidth[i] + 12,
        height: height - TOP - BOTTOM + 30, rx: 6, "data-column": c }));
      var label = svg("g", { "class": "column-label", "data-column": c }), fits = Math.max(4, Math.floor(columnWidth[i] / 7));
      label.appendChild(svg("title", {}, c));  // the full name on hover
      label.appendChild(svg("text", { x: columnX[i] + columnWidth[i] / 2, y: TOP - 10, "text-anchor": "middle" },
        c.length > fits ? c.slice(0, fits - 1) + "\u2026" : c));
      background.appendChild(label);
    });
  }
  rows.forEach(function (layer, i) {
    background.appendChild(svg("text", { "class": "row-label", x: 6, y: rowY[i] + 4 }, rowLabel(layer)));
  });

  var nodeElements = nodes.map(function (n) {
    var g = svg("g", { "class": "node " + n.kind, "data-id": n.id, "data-index": n.i, transform: "translate(" + n.x + "," + n.y + ")" });
    if (dotMode) g.appendChild(svg("circle", { r: NODE_W / 2, fill: nodeFill(n) }));
    else {
      g.appendChild(svg("rect", { x: -NODE_W / 2, y: -NODE_H / 2, width: NODE_W, height: NODE_H, rx: 5, fill: nodeFill(n) }));
      g.appendChild(svg("text", { "text-anchor": "middle", y: 4 }, shortLabel(n)));
    }
    nodeLayer.appendChild(g);
    return g;
  });

  // grouped view: one node per (group, column); edges between members of one group are not drawn
  var groupNodes = [];
  var groupNodeOf = new Int32Array(nN).fill(-1);
  if (groups.length) {
    var byKey = {};
    nodes.forEach(function (n) {
      var gi = groupOf(n);
      if (gi < 0) return;
      var key = gi + "|" + n.col;
      if (!(key in byKey)) {
        byKey[key] = groupNodes.length;
        var g = groups[gi];
        groupNodes.push({ gi: gi, id: String(g.id === undefined ? gi : g.id) + (n.column !== null ? "@" + n.column : ""),
          name: String(g.name === undefined ? g.id : g.name), members: [], column: n.column });
      }
      var gn = groupNodes[byKey[key]];
      gn.members.push(n.i);
      groupNodeOf[n.i] = byKey[key];
    });
    // the grouped layout: a group sits in its top member's row, where its first member was
    var groupedCells = {};
    function add(key, item) { (groupedCells[key] = groupedCells[key] || []).push(item); }
    nodes.forEach(function (n) { if (groupNodeOf[n.i] < 0) add(n.r + "|" + n.col, n); });
    groupNodes.forEach(function (gn) {
      gn.r = Math.max.apply(null, gn.members.map(function (i) { return nodes[i].r; }));
      gn.rank = Math.min.apply(null, gn.members.map(function (i) { return nodes[i].rank; }));
      gn.slots = dotMode ? 1 : 2;
      add(gn.r + "|" + nodes[gn.members[0]].col, gn);
    });
    Object.keys(groupedCells).forEach(function (key) {
      var parts = key.split("|"), cell = groupedCells[key];
      cell.sort(function (a, b) { return a.rank - b.rank; });
      placeCell(cell, +parts[0], +parts[1]);
      cell.forEach(function (item) { item.gx = item.x; item.gy = item.y; });
    });
    nodes.forEach(function (n) { n.x = n.x0; n.y = n.y0; });
    groupNodes.forEach(function (gn) {
      var wide = dotMode ? 16 : 2 * STEP_X - 8, high = dotMode ? 16 : NODE_H + 4;
      var g = svg("g", { "class": "node group-node", "data-group": gn.id, transform: "translate(" + gn.gx + "," + gn.gy + ")" });
      g.appendChild(svg("rect", { x: -wide / 2, y: -high / 2, width: wide, height: high, rx: 8, fill: GROUP_PALETTE[gn.gi % GROUP_PALETTE.length] }));
      if (!dotMode) g.appendChild(svg("text", { "text-anchor": "middle", y: 4 }, gn.name.length > 20 ? gn.name.slice(0, 19) + "\u2026" : gn.name));
      gn.element = g;
      g.style.display = "none";
      groupLayer.appendChild(g);
    });
  }

  function moveNodes() {  // between the plain and the grouped layout
    nodes.forEach(function (n, i) {
      n.x = state.grouped && n.gx !== undefined ? n.gx : n.x0;
      n.y = state.grouped && n.gy !== undefined ? n.gy : n.y0;
      nodeElements[i].setAttribute("transform", "translate(" + n.x + "," + n.y + ")");
    });
  }

  var current = null;  // the last selection and the edges drawn for it

  function endpoint(i) {
    if (state.grouped && groupNodeOf[i] >= 0) return { key: "g" + groupNodeOf[i], x: groupNodes[groupNodeOf[i]].gx, y: groupNodes[groupNodeOf[i]].gy };
    return { key: "n" + i, x: nodes[i].x, y: nodes[i].y };
  }

  function drawnEdges(selection) {
    var list = [];
    for (var e = 0; e < nE; e++) if (selection.edgeSel[e] && state.show[TYPES[edgeType[e]]]) list.push(e);
    var capped = list.length > MAX_DRAWN;
    if (capped) list = list.sort(function (a, b) { return Math.abs(E.w[b] || 0) - Math.abs(E.w[a] || 0) || a - b; }).slice(0, MAX_DRAWN);
    return { list: list, capped: capped };
  }

  function renderEdges(list) {
    while (edgeLayer.firstChild) edgeLayer.removeChild(edgeLayer.firstChild);
    var items = [];
    if (state.grouped) {  // merge parallel edges between groups, summing their scores
      var merged = {};
      list.forEach(function (e) {
        var a = endpoint(E.s[e]), b = endpoint(E.t[e]);
        if (a.key === b.key) return;
        var key = a.key + ">" + b.key + ">" + E.c[e];
        if (!(key in merged)) { merged[key] = items.length; items.push({ edges: [], score: null, a: a, b: b, c: E.c[e] }); }
        var item = items[merged[key]];
        item.edges.push(e);
        if (E.w[e] !== null) item.score = (item.score || 0) + E.w[e];
      });
    } else {
      items = list.map(function (e) { return { edges: [e], score: E.w[e], a: endpoint(E.s[e]), b: endpoint(E.t[e]), c: E.c[e] }; });
    }
    var maxAbs = 0;
    items.forEach(function (it) { if (it.score !== null) maxAbs = Math.max(maxAbs, Math.abs(it.score)); });
    maxAbs = maxAbs || 1;
    items.sort(function (p, q) { return Math.abs(p.score || 0) - Math.abs(q.score || 0); });  // strongest on top
    var fragment = document.createDocumentFragment();
    items.forEach(function (it) {
      var channel = CHANNELS[it.c];
      var port = dotMode || !channel ? 0 : (it.c - 2) * NODE_W / 4;
      var x1 = it.a.x, y1 = it.a.y - NODE_H / 2, x2 = it.b.x + port, y2 = it.b.y + NODE_H / 2;
      var bend = Math.max(30, Math.abs(y1 - y2) / 2);
      var d = "M" + x1 + "," + y1 + " C" + x1 + "," + (y1 - bend) + " " + x2 + "," + (y2 + bend) + " " + x2 + "," + y2;
      var colour = channel ? CHANNEL_COLOUR[channel] : it.score === null ? NEUTRAL : it.score >= 0 ? POSITIVE : NEGATIVE;
      var widthPx = it.score === null ? 1 : 0.6 + 4.4 * Math.abs(it.score) / maxAbs;
      var path = svg("path", { "class": "edge", d: d, stroke: colour, "stroke-width": widthPx.toFixed(2), "stroke-opacity": 0.8,
        "data-name": it.edges.length === 1 ? edgeName(it.edges[0]) : it.a.key + "->" + it.b.key,
        "data-score": it.score === null ? "" : String(it.score), "data-channel": channel || "",
        "data-edges": it.edges.join(" ") });
      if (it.score !== null && it.score < 0) path.setAttribute("stroke-dasharray", "5 3");
      fragment.appendChild(path);
    });
    edgeLayer.appendChild(fragment);
    return items.length;
  }

  function renderNodes(selection) {
    var query = state.search.toLowerCase();
    nodes.forEach(function (n, i) {
      var element = nodeElements[i];
      element.style.display = state.grouped && groupNodeOf[i] >= 0 ? "none" : "";
      element.classList.toggle("off", !selection.nodeSel[i]);
      element.classList.toggle("chosen", state.chosen === i);
      var match = query !== "" && (n.id.toLowerCase().indexOf(query) >= 0 || (n.label || "").toLowerCase().indexOf(query) >= 0);
      element.classList.toggle("match", match);
      element.classList.toggle("dim", query !== "" && !match);
      var shape = element.firstChild;
      shape.setAttribute("fill", nodeFill(n));
    });
    groupNodes.forEach(function (gn) {
      gn.element.style.display = state.grouped ? "" : "none";
      var on = gn.members.some(function (i) { return selection.nodeSel[i]; });
      gn.element.classList.toggle("off", !on);
    });
  }

  function render() {
    var selection = computeSelection();
    var drawn = drawnEdges(selection);
    var nDrawn = renderEdges(drawn.list);
    renderNodes(selection);
    current = { selection: selection, drawn: drawn, drawnSet: new Set(drawn.list) };
    $("unit-count").textContent = String(selection.nUnits);
    $("unit-name").textContent = unitName;
    $("edge-count").textContent = String(nDrawn);
    $("cap-note").textContent = drawn.capped ? "(the " + MAX_DRAWN + " strongest are drawn)" : "";
    var by = state.absolute ? "|score|" : "score";
    $("mode").textContent = state.recorded ? "recorded circuit: " + (circuit.selection_rule || "as saved")
      : "top " + state.n + " by " + by + (rankedEdges && state.prune ? ", tree-shaken" : "");
    $("slider").value = String(state.n);
    $("top-n").value = String(state.n);
    var order = orders[state.absolute ? "abs" : "signed"];
    $("threshold").value = state.n > 0 && state.n <= order.length ? floorDigits(rankKey(unitScore(order[state.n - 1]))) : "";
    var ofTotal = circuit.n_total > units.length ? units.length + " strongest of " + circuit.n_total + " kept in this file" : String(units.length);
    $("slider-label").textContent = "top n " + unitName + " by " + by + " (of " + ofTotal + ")";
    updateCurve(state.recorded ? selection.nUnits : state.n);  // the curve keeps the top n, untree-shaken
    if (state.chosen !== null && typeof state.chosen === "number") showNode(state.chosen);
  }

  // ---------------------------------------------------------------- details and tooltip
  var details = $("details");
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function row(table, key, value, field, raw) {
    var tr = el("tr");
    tr.appendChild(el("td", {}, key));
    var td = el("td", field ? { "data-field": field } : {}, value);
    if (raw !== undefined) td.setAttribute("data-value", raw);
    tr.appendChild(td);
    table.appendChild(tr);
  }
  function renderValue(value, depth) {
    if (value === null || typeof value !== "object") return el("span", {}, typeof value === "number" ? fmt(value) : String(value));
    if (depth > 4) return el("span", {}, "\u2026");
    if (Array.isArray(value)) {
      if (value.every(function (v) { return v === null || typeof v !== "object"; })) {
        return el("span", {}, value.map(function (v) { return typeof v === "number" ? fmt(v) : String(v); }).join(", "));
      }
      var ul = el("ul");
      value.forEach(function (v) { var li = el("li"); li.appendChild(renderValue(v, depth + 1)); ul.appendChild(li); });
      return ul;
    }
    var table = el("table");
    Object.keys(value).forEach(function (key) {
      var tr = el("tr"), td = el("td");
      tr.appendChild(el("td", {}, key));
      td.appendChild(renderValue(value[key], depth + 1));
      tr.appendChild(td);
      table.appendChild(tr);
    });
    return table;
  }
  function edgeList(title, edgeIds, other) {
    var drawnHere = edgeIds.filter(function (e) { return current && current.drawnSet.has(e); });
    drawnHere.sort(function (a, b) { return Math.abs(E.w[b] || 0) - Math.abs(E.w[a] || 0); });
    var box = el("div", { "data-field": title.split(" ")[0] + "-edges" });
    box.appendChild(el("h3", {}, title + " (" + drawnHere.length + " drawn of " + edgeIds.length + ")"));
    var ul = el("ul");
    drawnHere.slice(0, 15).forEach(function (e) {
      var channel = CHANNELS[E.c[e]];
      ul.appendChild(el("li", {}, nodes[other(e)].id + (channel ? " <" + channel + ">" : "") + "  " + fmt(E.w[e])));
    });
    if (drawnHere.length > 15) ul.appendChild(el("li", {}, "\u2026 " + (drawnHere.length - 15) + " more"));
    box.appendChild(ul);
    return box;
  }
  function showNode(i) {
    var n = nodes[i];
    clear(details);
    details.setAttribute("data-node", n.id);
    details.appendChild(el("h2", {}, n.id));
    var table = el("table");
    row(table, "kind", n.kind, "kind");
    row(table, "row", rowLabel(n.row), "layer");
    if (n.column !== null) row(table, "position", n.column, "column");
    row(table, "score", fmt(n.score) + (n.score === null && rankedEdges ? " (this circuit scores edges)" : ""), "score", n.score === null ? "" : String(n.score));
    row(table, "in the recorded circuit", n.inCircuit ? "yes" : "no", "in-circuit");
    row(table, "selected now", current && current.selection.nodeSel[i] ? "yes" : "no", "selected");
    if (n.label !== null && n.label !== undefined) row(table, n.kind === "feature" ? "top tokens" : "label", n.label, "label");
    details.appendChild(table);
    if (nE) {
      details.appendChild(edgeList("in edges", inEdges[i], function (e) { return E.s[e]; }));
      details.appendChild(edgeList("out edges", outEdges[i], function (e) { return E.t[e]; }));
    }
    var entry = explanationOf(n);
    if (entry) {
      var box = el("div", { "data-field": "explanation" });
      box.appendChild(el("h3", {}, "explanation"));
      var gi = groupOf(n);
      if (gi >= 0) box.appendChild(el("p", { "data-field": "group" }, "group: " + String(groups[gi].name === undefined ? groups[gi].id : groups[gi].name)));
      if (Array.isArray(entry.roles)) {
        var ul = el("ul", { "data-field": "roles" });
        entry.roles.forEach(function (r) {
          var text = r && typeof r === "object" ? String(r.role) + (r.score !== undefined ? " " + fmt(r.score) : "") + (r.probe ? " (" + r.probe + ")" : "") : String(r);
          ul.appendChild(el("li", {}, text));
        });
        box.appendChild(el("div", {}, "roles"));
        box.appendChild(ul);
      }
      Object.keys(entry).forEach(function (key) {
        if (key === "roles" || key === "group") return;
        box.appendChild(el("h3", {}, key === "dla" ? "direct logit attribution" : key));
        box.appendChild(renderValue(entry[key], 0));
      });
      details.appendChild(box);
    }
  }
  function showGroup(k) {
    var gn = groupNodes[k];
    clear(details);
    details.setAttribute("data-node", gn.id);
    details.appendChild(el("h2", {}, gn.name));
    var table = el("table");
    row(table, "group", gn.id, "group");
    row(table, "members", gn.members.map(function (i) { return nodes[i].id; }).join(", "), "members");
    details.appendChild(table);
  }
  function edgeText(e) {
    var s = nodes[E.s[e]], t = nodes[E.t[e]], channel = CHANNELS[E.c[e]];
    var lines = [edgeName(e), "score " + fmt(E.w[e]) + (channel ? "   channel " + channel : "")];
    if (s.column !== null || t.column !== null) lines.push("positions " + (s.column === null ? "-" : s.column) + " \u2192 " + (t.column === null ? "-" : t.column));
    lines.push("in the recorded circuit: " + (E.m[e] ? "yes" : "no"));
    return lines.join("\n");
  }
  function pathText(path) {
    var ids = path.getAttribute("data-edges").split(" ").map(Number);
    if (ids.length === 1) return edgeText(ids[0]);
    return path.getAttribute("data-name") + "\n" + ids.length + " edges, summed score " + fmt(Number(path.getAttribute("data-score")));
  }
  function nodeText(n) {
    var lines = [n.id, "score " + fmt(n.score)];
    if (n.label) lines.push(n.label);
    return lines.join("\n");
  }
  var tooltip = $("tooltip");
  function showTip(text, event) {
    tooltip.textContent = text;
    tooltip.hidden = false;
    tooltip.style.left = Math.min(event.clientX + 14, window.innerWidth - 300) + "px";
    tooltip.style.top = (event.clientY + 14) + "px";
  }
  graph.addEventListener("mousemove", function (event) {
    var target = event.target;
    var path = target.closest ? target.closest(".edge") : null;
    var g = target.closest ? target.closest(".node") : null;
    if (path) showTip(pathText(path), event);
    else if (g && g.hasAttribute("data-index")) showTip(nodeText(nodes[+g.getAttribute("data-index")]), event);
    else if (g && g.hasAttribute("data-group")) showTip(g.getAttribute("data-group"), event);
    else tooltip.hidden = true;
  });
  graph.addEventListener("mouseleave", function () { tooltip.hidden = true; });
  graph.addEventListener("click", function (event) {
    var g = event.target.closest ? event.target.closest(".node") : null;
    var path = event.target.closest ? event.target.closest(".edge") : null;
    if (g && g.hasAttribute("data-index")) { state.chosen = +g.getAttribute("data-index"); renderNodes(current.selection); showNode(state.chosen); }
    else if (g && g.hasAttribute("data-group")) {
      var k = groupNodes.findIndex(function (gn) { return gn.id === g.getAttribute("data-group"); });
      state.chosen = "group"; showGroup(k);
    } else if (path) {
      state.chosen = null;
      renderNodes(current.selection);
      clear(details);
      details.removeAttribute("data-node");
      details.appendChild(el("h2", {}, "edge"));
      details.appendChild(el("p", { "data-field": "edge", style: "white-space: pre-wrap" }, pathText(path)));
    }
  });

  // ---------------------------------------------------------------- faithfulness curve
  var curve = meta.faithfulness && Array.isArray(meta.faithfulness.x) ? meta.faithfulness : null;
  var curveScale = null;
  function drawCurve() {
    if (!curve) return;
    $("curve-box").hidden = false;
    var box = $("curve"), W = 300, H = 170, L = 34, R = 8, T = 8, B = 26;
    var xs = curve.x.map(function (x) { return Math.max(1, x); });
    var series = [["signed", curve.curve_signed], ["absolute", curve.curve_absolute]].filter(function (s) { return Array.isArray(s[1]); });
    var ys = [0, 1];  // the axis always shows 0 (empty circuit) and 1 (full model)
    series.forEach(function (s) { s[1].forEach(function (y) { if (typeof y === "number") ys.push(y); }); });
    var xMin = Math.log(Math.min.apply(null, xs)), xMax = Math.log(Math.max.apply(null, xs.concat([Math.min.apply(null, xs) + 1])));
    var yMin = Math.min.apply(null, ys), yMax = Math.max.apply(null, ys);
    function X(n) { return L + (Math.log(Math.max(1, n)) - xMin) / (xMax - xMin || 1) * (W - L - R); }
    function Y(f) { return T + (yMax - f) / (yMax - yMin || 1) * (H - T - B); }
    curveScale = { X: X, Y: Y, T: T, B: H - B, xLo: Math.exp(xMin), xHi: Math.exp(xMax) };
    box.appendChild(svg("line", { "class": "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
    box.appendChild(svg("line", { "class": "axis", x1: L, y1: T, x2: L, y2: H - B }));
    [yMin, 0, 1, yMax].filter(function (v, i, a) { return a.indexOf(v) === i && (v === 0 || v === 1 || v < -0.1 || v > 1.1); })
      .forEach(function (v) { box.appendChild(svg("text", { x: L - 4, y: Y(v) + 3, "text-anchor": "end" }, v.toFixed(v === 0 || v === 1 ? 0 : 2))); });
    box.appendChild(svg("line", { "class": "axis", x1: L, y1: Y(1), x2: W - R, y2: Y(1), "stroke-dasharray": "2 3" }));
    [Math.exp(xMin), Math.exp(xMax)].forEach(function (v, i) {
      box.appendChild(svg("text", { x: X(v), y: H - B + 12, "text-anchor": i ? "end" : "start" }, String(Math.round(v))));
    });
    box.appendChild(svg("text", { x: (L + W - R) / 2, y: H - 3, "text-anchor": "middle" }, unitName + " kept (log scale)"));
    series.forEach(function (s) {
      var points = [];
      s[1].forEach(function (y, k) { if (typeof y === "number") points.push(X(xs[k]).toFixed(1) + "," + Y(y).toFixed(1)); });
      box.appendChild(svg("polyline", { "class": s[0], id: "curve-" + s[0], points: points.join(" ") }));
    });
    if (typeof curve.faithfulness === "number") {
      box.appendChild(svg("circle", { id: "curve-recorded", cx: X(circuit.n_in_circuit || 1), cy: Y(curve.faithfulness), r: 3.5, fill: "#000" }));
    }
    box.appendChild(svg("line", { id: "curve-marker", x1: L, y1: T, x2: L, y2: H - B }));
    var note = [];
    if (typeof curve.faithfulness === "number") note.push("f(C) = " + fmt(curve.faithfulness) + " (dot: the recorded circuit)");
    else if (curve.undefined) note.push("f undefined: " + curve.undefined);
    if (typeof curve.cpr === "number") note.push("CPR " + fmt(curve.cpr) + ", CMD " + fmt(curve.cmd));
    note.push("blue: signed ranking, orange: |score|; red line: the slider");
    $("curve-note").textContent = note.join("\n");
  }
  function updateCurve(n) {
    if (!curveScale) return;
    var marker = $("curve-marker"), x = curveScale.X(Math.min(Math.max(n, curveScale.xLo), curveScale.xHi));
    marker.setAttribute("x1", x.toFixed(1)); marker.setAttribute("x2", x.toFixed(1));
    marker.setAttribute("data-n", String(n));
    ["signed", "absolute"].forEach(function (kind) {
      var line = $("curve-" + kind);
      if (!line) return;
      var active = (kind === "absolute") === state.absolute;
      line.classList.toggle("active", active);
      line.classList.toggle("inactive", !active);
    });
  }

  // ---------------------------------------------------------------- controls
  function setN(n) {
    state.n = Math.max(0, Math.min(units.length, Math.round(n)));
    state.recorded = false;
    render();
  }
  function wire() {
    var slider = $("slider");
    slider.max = String(units.length);
    slider.addEventListener("input", function () { setN(+slider.value); });
    $("top-n").max = String(units.length);
    $("top-n").addEventListener("change", function () { var v = parseFloat(this.value); if (isFinite(v)) setN(v); });
    $("threshold").addEventListener("change", function () {
      var t = parseFloat(this.value);
      if (!isFinite(t)) return;
      var order = orders[state.absolute ? "abs" : "signed"], n = 0;
      while (n < order.length && rankKey(unitScore(order[n])) >= t) n++;
      setN(n);
    });
    $("reset").addEventListener("click", function () { state.recorded = true; state.n = recordedUnits.length; render(); });
    var rankAbs = $("rank-abs");
    rankAbs.checked = state.absolute;
    rankAbs.addEventListener("change", function () { state.absolute = rankAbs.checked; render(); });
    var prune = $("prune");
    prune.checked = state.prune;
    $("prune-label").hidden = !rankedEdges;
    prune.addEventListener("change", function () { state.prune = prune.checked; if (!state.recorded) render(); });
    TYPES.forEach(function (type, k) {
      var box = $("toggle-" + type), present = false;
      for (var e = 0; e < nE && !present; e++) present = edgeType[e] === k;
      box.parentNode.hidden = !present;
      box.addEventListener("change", function () { state.show[type] = box.checked; render(); });
    });
    $("edge-toggles").hidden = nE === 0;
    var search = $("search");
    search.addEventListener("input", function () {
      state.search = search.value.trim();
      renderNodes(current.selection);
      var count = graph.querySelectorAll(".node.match").length;
      $("search-count").textContent = state.search ? count + " match" + (count === 1 ? "" : "es") : "";
    });
    search.addEventListener("keydown", function (event) {
      if (event.key !== "Enter") return;
      var first = graph.querySelector(".node.match[data-index]");
      if (first) { state.chosen = +first.getAttribute("data-index"); renderNodes(current.selection); showNode(state.chosen); }
    });
    $("zoom-in").addEventListener("click", function () { setZoom(+graph.getAttribute("data-zoom") * 1.25); });
    $("zoom-out").addEventListener("click", function () { setZoom(+graph.getAttribute("data-zoom") / 1.25); });
    $("zoom-fit").addEventListener("click", function () { setZoom(fitZoom); });
    if (groups.length) {
      $("group-controls").hidden = false;
      $("grouped").addEventListener("change", function () { state.grouped = this.checked; moveNodes(); render(); });
      var colourBy = $("colour-by");
      colourBy.value = state.colourBy;
      colourBy.addEventListener("change", function () { state.colourBy = colourBy.value; renderNodes(current.selection); });
    }
  }

  var started = performance.now();
  document.title = String(meta.title || "circuit");
  $("title").textContent = String(meta.title || "circuit");
  $("subtitle").textContent = meta.kind + " circuit \u00b7 " + (circuit.n_in_circuit === undefined ? "?" : circuit.n_in_circuit) + " of " +
    (circuit.n_total === undefined ? "?" : circuit.n_total) + " " + unitName + " in the recorded circuit (" + (circuit.selection_rule || "") + ")";
  wire();
  drawCurve();
  render();
  document.body.setAttribute("data-ready", "1");
  document.body.setAttribute("data-render-ms", (performance.now() - started).toFixed(1));
})();
