// What the service publishes about itself, fetched once per page load: the model presets (GET /v1/presets, with
// the training defaults each applies) and the bounds and defaults of a job spec's fields (the JobSpec schema in
// /openapi.json), so that the new-job form repeats none of the API's numbers.

import { api } from "./api.js";

let presets = null;

/** The presets of GET /v1/presets (asked for once; a failure is asked again next time). */
export async function loadPresets(signal) {
  if (!presets) presets = await api("/v1/presets", { signal });
  return presets;
}

/** The presets when they have been loaded already, else none: for hints that need not wait. */
export function loadedPresets() {
  return presets || [];
}

let specFields = null;

/**
 * The bounds and defaults of the job spec's fields, from `components.schemas.JobSpec` of /openapi.json:
 * `field(name)` is `{ minimum, maximum, maxLength, default }`, each undefined where the schema says nothing.
 * Where the service publishes no JobSpec schema, no field is bounded here: the API still checks every value (and
 * the page shows its sentence), and a field the form leaves empty takes the API's default.
 */
export async function loadSpecFields(signal) {
  if (specFields) return specFields;
  let properties;
  try {
    const doc = await api("/openapi.json", { signal, quiet401: true });
    properties = doc?.components?.schemas?.JobSpec?.properties;
  } catch (e) {
    if (signal?.aborted) throw e;
    return fieldReader({}); // not kept: the next view asks again
  }
  specFields = fieldReader(properties || {});
  return specFields;
}

function fieldReader(properties) {
  return {
    field(name) {
      const schema = properties[name] || {};
      // `int | None` and the like are an anyOf of the value's schema and {"type": "null"}.
      const variants = [schema, ...(schema.anyOf || []), ...(schema.oneOf || [])].filter((s) => s.type !== "null");
      const first = (key) => variants.map((s) => s[key]).find((v) => v !== undefined);
      return {
        minimum: first("minimum"),
        maximum: first("maximum"),
        maxLength: first("maxLength"),
        default: schema.default ?? undefined,
      };
    },
  };
}
