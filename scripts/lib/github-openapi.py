#!/usr/bin/python3
"""Extracts the part of GitHub's OpenAPI description the platform speaks.

    github-openapi.py PACKAGE_DIR TARBALL_SHA256 OUT_JSON OUT_RUST

PACKAGE_DIR is the unpacked `@octokit/openapi` npm package (its `package/`
folder). Writes two generated files, byte for byte the same for the same
package (sorted keys, fixed indentation), so `scripts/github-openapi.sh
--check` can regenerate and compare them:

- OUT_JSON: a JSON Schema (draft 2020-12) document. `$defs` holds the
  schemas of `POST /app/installations/{installation_id}/access_tokens`
  (request, 201 answer, 401/403/404/422 error bodies) and of
  `GET /app/installations` (200 answer), with every schema they refer to
  (`installation`, `installation-token`, `app-permissions`, `simple-user`,
  `enterprise`, `repository`, ...); `operations` names, per operation, the
  `$defs` entry of its request and of each answer status; `github_examples` holds
  GitHub's own examples of those answers; `source` records the package,
  its version and the tarball's SHA-256.
- OUT_RUST: the platform's permission table, every permission name of
  `app-permissions` with the levels GitHub accepts for it.

The description is OpenAPI 3.0, whose schemas are not quite JSON Schema;
the conversion is mechanical and total:
- `$ref: #/components/schemas/X` becomes `#/$defs/X`;
- `nullable: true` becomes `"null"` in `type` (and `null` in an `enum`), or
  an `anyOf` with `{"type": "null"}` for a schema without a `type`;
- `example` and vendor extensions (`x-...`) are dropped (they validate
  nothing); a `$ref` with siblings keeps only the `$ref` (3.0 ignores them).
Anything else unknown to this script fails the run instead of being
guessed at.

`GET /app/installations`' answer is inlined in the description as an array
of a copy of `installation` whose `account` is `allOf` [user, enterprise]
(no real account is both). The named `installation` schema says `anyOf`,
which is what GitHub answers, so the listing's answer is taken as an array
of `#/$defs/installation`, after checking that the inline copy is that
schema (same title, same required fields).
"""

import copy
import json
import sys

SPEC_FILE = "generated/api.github.com.json"

MINT_PATH = "/app/installations/{installation_id}/access_tokens"
LIST_PATH = "/app/installations"

# Schemas wanted by name besides those the operations refer to.
ROOTS = ["installation", "installation-token", "app-permissions", "enterprise", "simple-user"]

# OpenAPI 3.0 schema keywords that are also JSON Schema 2020-12 keywords
# with the same meaning.
SAME = {
    "title", "description", "type", "properties", "required", "items", "enum",
    "format", "anyOf", "allOf", "oneOf", "additionalProperties", "minimum",
    "maximum", "minLength", "maxLength", "pattern", "minItems", "maxItems",
    "uniqueItems", "default", "readOnly", "writeOnly", "deprecated",
    "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "not",
    "minProperties", "maxProperties",
}
DROPPED = {"example", "externalDocs", "xml", "discriminator"}


def fail(message):
    sys.stderr.write(f"github-openapi: {message}\n")
    sys.exit(1)


def convert(schema, where):
    """One OpenAPI 3.0 schema object as JSON Schema 2020-12."""
    if not isinstance(schema, dict):
        fail(f"{where}: a schema is not an object")
    if "$ref" in schema:
        ref = schema["$ref"]
        prefix = "#/components/schemas/"
        if not ref.startswith(prefix):
            fail(f"{where}: unexpected $ref {ref}")
        return {"$ref": "#/$defs/" + ref[len(prefix):]}
    out = {}
    nullable = False
    for key, value in schema.items():
        if key == "nullable":
            nullable = bool(value)
        elif key in DROPPED or key.startswith("x-"):
            continue
        elif key == "properties":
            out[key] = {name: convert(sub, f"{where}.{name}") for name, sub in value.items()}
        elif key in ("items", "not"):
            out[key] = convert(value, f"{where}[{key}]")
        elif key == "additionalProperties" and isinstance(value, dict):
            out[key] = convert(value, f"{where}[*]")
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [convert(sub, f"{where}/{key}/{i}") for i, sub in enumerate(value)]
        elif key in SAME:
            out[key] = copy.deepcopy(value)
        else:
            fail(f"{where}: keyword {key!r} is not handled by this conversion")
    if nullable:
        if "type" in out:
            types = out["type"] if isinstance(out["type"], list) else [out["type"]]
            out["type"] = types + ["null"]
            if "enum" in out and None not in out["enum"]:
                out["enum"] = out["enum"] + [None]
        else:
            annotations = {k: out.pop(k) for k in ("title", "description") if k in out}
            out = dict(annotations, anyOf=[out, {"type": "null"}])
    return out


def references(value, found):
    if isinstance(value, dict):
        for key, sub in value.items():
            if key == "$ref" and isinstance(sub, str):
                found.add(sub.rsplit("/", 1)[-1])
            else:
                references(sub, found)
    elif isinstance(value, list):
        for sub in value:
            references(sub, found)


def json_body(spec, holder, where):
    """The application/json schema of a request body or response."""
    if "$ref" in holder:
        name = holder["$ref"].rsplit("/", 1)[-1]
        holder = spec["components"]["responses"][name]
    content = holder.get("content", {}).get("application/json")
    if content is None:
        fail(f"{where}: no application/json content")
    return content["schema"]


def example_value(spec, content, where):
    example = content.get("examples", {}).get("default")
    if example is None:
        fail(f"{where}: no default example")
    if "$ref" in example:
        example = spec["components"]["examples"][example["$ref"].rsplit("/", 1)[-1]]
    return example["value"]


def main():
    if len(sys.argv) != 5:
        fail("usage: github-openapi.py PACKAGE_DIR TARBALL_SHA256 OUT_JSON OUT_RUST")
    package_dir, tarball_sha256, out_json, out_rust = sys.argv[1:]
    with open(f"{package_dir}/package.json", encoding="utf-8") as f:
        package = json.load(f)
    with open(f"{package_dir}/{SPEC_FILE}", encoding="utf-8") as f:
        spec = json.load(f)
    if not spec.get("openapi", "").startswith("3.0."):
        fail(f"expected an OpenAPI 3.0 description, found {spec.get('openapi')!r}")
    schemas = spec["components"]["schemas"]

    defs = {}
    operations = {}
    examples = {}

    mint = spec["paths"][MINT_PATH]["post"]
    mint_name = mint["operationId"].split("/", 1)[1]
    request = mint["requestBody"]["content"]["application/json"]
    defs[f"{mint_name}.request"] = convert(request["schema"], f"{mint_name}.request")
    examples[f"{mint_name}.request"] = request["examples"]["default"]["value"]
    answers = {}
    for status, response in sorted(mint["responses"].items()):
        schema = json_body(spec, response, f"{mint_name} {status}")
        if "$ref" not in schema:
            fail(f"{mint_name} {status}: expected a named schema")
        answers[status] = schema["$ref"].rsplit("/", 1)[-1]
    created = mint["responses"]["201"]["content"]["application/json"]
    examples[f"{mint_name}.201"] = example_value(spec, created, f"{mint_name} 201")
    operations[mint_name] = {
        "method": "POST",
        "path": MINT_PATH,
        "request": f"{mint_name}.request",
        "responses": answers,
    }

    listing = spec["paths"][LIST_PATH]["get"]
    list_name = listing["operationId"].split("/", 1)[1]
    content = listing["responses"]["200"]["content"]["application/json"]
    inline = content["schema"]
    named = schemas["installation"]
    if (
        inline.get("type") != "array"
        or inline["items"].get("title") != named["title"]
        or sorted(inline["items"]["required"]) != sorted(named["required"])
    ):
        fail(f"{list_name}: the inline answer is no longer a copy of `installation`")
    defs[f"{list_name}.200"] = {
        "$comment": "the description inlines a copy of installation here (see the generator)",
        "type": "array",
        "items": {"$ref": "#/$defs/installation"},
    }
    examples[f"{list_name}.200"] = example_value(spec, content, f"{list_name} 200")
    operations[list_name] = {
        "method": "GET",
        "path": LIST_PATH,
        "responses": {"200": f"{list_name}.200"},
    }

    wanted = set(ROOTS) | {name for name in answers.values()}
    references(defs, wanted)
    done = set()
    while wanted - done:
        name = sorted(wanted - done)[0]
        done.add(name)
        if name not in schemas:
            fail(f"schema {name} is not in the description")
        defs[name] = convert(schemas[name], name)
        references(defs[name], wanted)

    permissions = []
    for name, prop in schemas["app-permissions"]["properties"].items():
        levels = prop.get("enum")
        if prop.get("type") != "string" or not levels:
            fail(f"app-permissions.{name}: not a string enum")
        permissions.append((name, levels))
    permissions.sort()

    document = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": "GENERATED by scripts/github-openapi.sh from the npm package below; do not edit",
        "source": {
            "package": package["name"],
            "version": package["version"],
            "file": SPEC_FILE,
            "openapi": spec["openapi"],
            "tarball_sha256": tarball_sha256,
        },
        "$defs": defs,
        "operations": operations,
        "github_examples": examples,
    }
    with open(out_json, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=1, sort_keys=True, ensure_ascii=True)
        f.write("\n")

    lines = [
        "//! GitHub's App permissions and the levels each accepts: GENERATED by",
        "//! `scripts/github-openapi.sh` from the `app-permissions` schema of",
        f"//! {package['name']} {package['version']} ({SPEC_FILE}); do not edit.",
        "",
        "/// The version of GitHub's API description this table comes from.",
        f"pub const SOURCE: &str = \"{package['name']} {package['version']}\";",
        "",
        "/// Every permission name GitHub's `app-permissions` has, sorted, with the",
        "/// levels GitHub accepts for it when minting an installation token.",
        "#[rustfmt::skip]",
        "pub const APP_PERMISSIONS: &[(&str, &[&str])] = &[",
    ]
    for name, levels in permissions:
        quoted = ", ".join(f'"{level}"' for level in levels)
        lines.append(f'    ("{name}", &[{quoted}]),')
    lines.append("];")
    with open(out_rust, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
