// A form built from a JSON schema (pydantic's, as the server validates with): enums as selects, bounded numbers as
// sliders with their limits, image URL fields (`*image_url`, `*mask_url`) as file pickers (uploaded through the
// server's storage route), arrays of objects (LoRAs, ControlNets) as lists of rows, an enum-or-object union
// (image_size) as a select with a "custom" choice.
// Each field reads back its value (undefined: leave the argument out, so the server's default applies) and can show
// an error message beside itself.
"use strict";

import { el } from "./common.js";

const SLIDER_MAX_SPAN = 1000;
let uid = 0;

function resolve(schema, root) {
  if (schema && schema.$ref) return root.$defs?.[schema.$ref.split("/").pop()] || {};
  return schema || {};
}

function label(name, schema) {
  return schema.title || name.replace(/_/g, " ");
}

function isImageInput(name, schema) {
  return schema.type === "string" && /(^|_)(image|mask)_url$/.test(name);
}

function same(a, b) {
  return JSON.stringify(a) === JSON.stringify(b);
}

// One field: `wrap` (the DOM), `read()`, `fields` (nested, for error lookup by path), `showError(msg)`.
function makeField(name, path, rawSchema, root, required, uploader) {
  let schema = resolve(rawSchema, root);
  let nullable = false;
  const variants = (schema.anyOf || []).map((s) => resolve(s, root));
  if (variants.length) {
    const nonNull = variants.filter((s) => s.type !== "null");
    nullable = nonNull.length < variants.length;
    if (nonNull.length === 1) schema = { ...nonNull[0], title: rawSchema.title, default: rawSchema.default };
  }
  const id = `f${++uid}`;
  const errorId = `${id}-error`;
  const title = label(name, schema);
  const help = [];
  const error = el("p", { class: "field-error", id: errorId, role: "alert", hidden: true });
  const wrap = el("div", { class: "field", "data-field": path });
  const control = { wrap, fields: {}, path };
  const def = rawSchema.default !== undefined ? rawSchema.default : schema.default;
  const requiredMark = required ? el("span", { class: "req", "aria-hidden": "true", text: " *" }) : null;

  const describe = (input) => {
    input.setAttribute("aria-describedby", errorId);
    control.inputs = [...(control.inputs || []), input];
  };

  if (schema.const !== undefined) {
    const input = el("input", { id, type: "text", value: String(schema.const), readonly: true });
    wrap.append(el("label", { for: id }, title), input);
    control.read = () => undefined;  // fixed by the schema: nothing to send
  } else if (variants.length > 1 && variants.some((s) => s.enum) && variants.some((s) => s.type === "object")) {
    // enum or object (image_size): presets plus a "custom" object
    const names = variants.find((s) => s.enum).enum;
    const objSchema = variants.find((s) => s.type === "object");
    const select = el("select", { id, name: path }, names.map((n) => el("option", { value: n, text: n })),
      el("option", { value: "__custom", text: "custom…" }));
    if (def !== undefined && typeof def === "string") select.value = def;
    const sub = makeObject(objSchema, root, path, uploader);
    sub.wrap.hidden = true;
    select.addEventListener("change", () => { sub.wrap.hidden = select.value !== "__custom"; });
    describe(select);
    wrap.append(el("label", { for: id }, title, requiredMark), select, sub.wrap);
    control.fields = sub.fields;
    control.read = () => {
      const value = select.value === "__custom" ? sub.read() : select.value;
      return same(value, def) && !required ? undefined : value;
    };
  } else if (schema.enum) {
    const select = el("select", { id, name: path },
      nullable || def === undefined ? el("option", { value: "", text: "(default)" }) : null,
      schema.enum.map((v) => el("option", { value: String(v), text: String(v) })));
    if (def !== undefined && def !== null) select.value = String(def);
    describe(select);
    wrap.append(el("label", { for: id }, title, requiredMark), select);
    control.read = () => {
      if (select.value === "") return undefined;
      const value = schema.enum.find((v) => String(v) === select.value);
      return same(value, def) && !required ? undefined : value;
    };
  } else if (schema.type === "boolean") {
    const box = el("input", { id, type: "checkbox", name: path, checked: Boolean(def) });
    describe(box);
    wrap.classList.add("check");
    wrap.append(box, el("label", { for: id }, title));
    control.read = () => (box.checked === Boolean(def) && !required ? undefined : box.checked);
  } else if (schema.type === "integer" || schema.type === "number") {
    const lo = schema.minimum ?? schema.exclusiveMinimum;
    const hi = schema.maximum ?? schema.exclusiveMaximum;
    const step = schema.type === "integer" ? 1 : (hi - lo) <= 10 ? 0.05 : 0.1;
    const number = el("input", { id, type: "number", name: path, step: String(step), inputmode: "decimal",
      placeholder: nullable ? "(empty: random / default)" : undefined });
    if (def !== undefined && def !== null) number.value = String(def);
    describe(number);
    wrap.append(el("label", { for: id }, title, requiredMark));
    if (lo !== undefined && hi !== undefined && hi - lo <= SLIDER_MAX_SPAN) {
      const slider = el("input", { type: "range", min: String(lo), max: String(hi), step: String(step),
        value: number.value || String(lo), "aria-label": `${title} (slider)`, tabindex: "-1" });
      slider.addEventListener("input", () => { number.value = slider.value; });
      number.addEventListener("input", () => { if (number.value !== "") slider.value = number.value; });
      wrap.append(el("div", { class: "slider" }, el("span", { class: "muted", text: String(lo) }), slider,
        el("span", { class: "muted", text: String(hi) }), number));
    } else {
      wrap.append(number);
    }
    if (lo !== undefined && hi !== undefined && hi - lo > SLIDER_MAX_SPAN) {
      help.push(hi > Number.MAX_SAFE_INTEGER ? `${lo} or more` : `${lo} to ${hi}`);
    }
    control.read = () => {
      if (number.value.trim() === "") return undefined;
      const value = Number(number.value);
      if (Number.isNaN(value)) return number.value;  // the server answers with the field's message
      return value === def && !required ? undefined : value;
    };
  } else if (isImageInput(name, schema)) {
    const text = el("input", { id, type: "url", name: path, placeholder: "an image URL, or pick a file below",
      inputmode: "url" });
    const file = el("input", { id: `${id}-file`, type: "file", accept: "image/*" });
    const status = el("span", { class: "muted", "aria-live": "polite" });
    const thumb = el("img", { class: "thumb", alt: `${title} preview`, hidden: true });
    file.addEventListener("change", async () => {
      const picked = file.files?.[0];
      if (!picked) return;
      status.textContent = "uploading…";
      try {
        const { url, how } = await uploader(picked);
        text.value = url;
        thumb.src = URL.createObjectURL(picked);
        thumb.hidden = false;
        status.textContent = `${picked.name} ${how}`;
      } catch (e) {
        status.textContent = `upload failed: ${e.message}`;
      }
    });
    describe(text);
    wrap.append(el("label", { for: id }, title, requiredMark), text,
      el("label", { for: `${id}-file`, class: "muted" }, "or upload an image"), file, status, thumb);
    control.read = () => (text.value.trim() === "" ? undefined : text.value.trim());
  } else if (schema.type === "string") {
    const long = /prompt/.test(name);
    const input = long ? el("textarea", { id, name: path, rows: 3 }) : el("input", { id, name: path, type: "text" });
    if (def !== undefined && def !== null) input.value = String(def);
    describe(input);
    wrap.append(el("label", { for: id }, title, requiredMark), input);
    control.read = () => {
      if (input.value === "" && !required) return undefined;
      return input.value === def && !required ? undefined : input.value;
    };
  } else if (schema.type === "array" && resolve(schema.items, root).type === "object") {
    const itemSchema = resolve(schema.items, root);
    const rows = [];
    const list = el("div", { class: "rows" });
    const max = schema.maxItems ?? Infinity;
    const add = el("button", { type: "button", class: "small", text: `Add ${title.replace(/s$/, "")}` });
    const renumber = () => rows.forEach((row, i) => {
      row.fieldset.dataset.field = `${path}.${i}`;
      row.fieldset.querySelector("legend").textContent = `${title.replace(/s$/, "")} ${i + 1}`;
    });
    add.addEventListener("click", () => {
      if (rows.length >= max) return;
      const row = makeObject(itemSchema, root, `${path}.${rows.length}`, uploader);
      row.fieldset = el("fieldset", { class: "row", "data-field": `${path}.${rows.length}` },
        el("legend", { text: `${title.replace(/s$/, "")} ${rows.length + 1}` }), row.wrap,
        el("button", { type: "button", class: "small link", text: "Remove", onclick: () => {
          rows.splice(rows.indexOf(row), 1); row.fieldset.remove(); renumber();
        } }));
      rows.push(row);
      list.append(row.fieldset);
    });
    wrap.append(el("span", { class: "label", text: title }), list, add);
    control.rows = rows;
    control.read = () => (rows.length ? rows.map((r) => r.read()) : undefined);
    control.lookup = (rest) => {
      const [index, ...tail] = rest;
      const row = rows[Number(index)];
      return row ? (tail.length ? row.fields[tail[0]] : row) : control;
    };
  } else if (schema.type === "object") {
    const sub = makeObject(schema, root, path, uploader);
    wrap.append(el("span", { class: "label", text: title }), sub.wrap);
    control.fields = sub.fields;
    control.read = sub.read;
  } else {
    const input = el("input", { id, name: path, type: "text", placeholder: "JSON" });
    describe(input);
    wrap.append(el("label", { for: id }, title), input);
    control.read = () => {
      if (input.value.trim() === "") return undefined;
      try { return JSON.parse(input.value); } catch { return input.value; }
    };
  }
  if (rawSchema.description || schema.description) help.push(rawSchema.description || schema.description);
  if (help.length) wrap.append(el("p", { class: "muted help", text: help.join(" · ") }));
  wrap.append(error);
  control.showError = (message) => {
    error.textContent = message;
    error.hidden = !message;
    for (const input of control.inputs || []) {
      if (message) input.setAttribute("aria-invalid", "true"); else input.removeAttribute("aria-invalid");
    }
    if (!message) return;
    wrap.classList.add("invalid");
  };
  control.clearError = () => { control.showError(""); wrap.classList.remove("invalid"); };
  return control;
}

function makeObject(schema, root, prefix, uploader) {
  const required = new Set(schema.required || []);
  const wrap = el("div", { class: "object" });
  const fields = {};
  for (const [name, prop] of Object.entries(schema.properties || {})) {
    const field = makeField(name, prefix ? `${prefix}.${name}` : name, prop, root, required.has(name), uploader);
    fields[name] = field;
    wrap.append(field.wrap);
  }
  const read = () => {
    const out = {};
    for (const [name, field] of Object.entries(fields)) {
      const value = field.read();
      if (value !== undefined) out[name] = value;
    }
    return out;
  };
  return { wrap, fields, read };
}

// The form for `schema` inside `container`: read() -> arguments; showErrors(detail) puts each 422 message beside
// its field (FastAPI's shape: loc ["body", field, ...]) and answers the messages no field took.
export function buildForm(container, schema, uploader) {
  container.replaceChildren();
  const root = makeObject(schema, schema, "", uploader);
  container.append(root.wrap);
  const all = () => {
    const out = [];
    const walk = (fields) => Object.values(fields).forEach((f) => {
      out.push(f);
      walk(f.fields || {});
      (f.rows || []).forEach((r) => walk(r.fields));
    });
    walk(root.fields);
    return out;
  };
  const find = (loc) => {
    let field = root.fields[loc[0]];
    let rest = loc.slice(1);
    while (field && rest.length) {
      if (field.lookup) { field = field.lookup(rest); rest = rest.slice(2); continue; }
      const next = field.fields?.[rest[0]];
      if (!next) break;
      field = next;
      rest = rest.slice(1);
    }
    return field && field.showError ? field : null;
  };
  return {
    read: root.read,
    clearErrors: () => all().forEach((f) => f.clearError && f.clearError()),
    showErrors(detail) {
      const unplaced = [];
      let first = null;
      for (const item of detail) {
        const loc = (item.loc || []).filter((part, i) => !(i === 0 && part === "body")).map(String);
        const field = loc.length ? find(loc) : null;
        if (field) {
          field.showError(item.msg);
          first = first || field;
        } else {
          unplaced.push(loc.length ? `${loc.join(".")}: ${item.msg}` : item.msg);
        }
      }
      first?.inputs?.[0]?.focus();
      return unplaced;
    },
  };
}
