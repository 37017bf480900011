#!/usr/bin/env node
// Compiles keywarden's test contracts (contracts/src/*.sol) offline with the npm `solc` package
// (solcjs) and extracts the ABIs of Safe 1.4.1, MultiSend and TimelockController from their npm
// packages.
//
// Writes:
//   contracts/out/<Contract>.json     {contractName, compiler, abi, bytecode, deployedBytecode,
//                                     immutableReferences: [[start, length], ...] (byte ranges of
//                                     the runtime code that hold immutables, zero in
//                                     deployedBytecode), storageLayout: [{label, slot, offset}]}
//   contracts-abi/<Contract>.json     ABI array (DstackKms, DstackApp, SafeL2, MultiSend,
//                                     TimelockController)
//
// Usage: node contracts/build.mjs            write the files
//        node contracts/build.mjs --check    rebuild in memory, exit 1 naming every stale file
//
// Output is deterministic: fixed compiler version and settings, no metadata appended to the
// bytecode, sorted inputs, stable JSON formatting.
import { readFileSync, readdirSync, writeFileSync, mkdirSync, existsSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..");
const require = createRequire(join(root, "package.json"));

const SOLC_VERSION = "0.8.24";
const EVM_VERSION = "cancun";
// Contracts whose bytecode is written to contracts/out/. The first three are keywarden's known
// code (their identities are compiled into the binary); the rest exist only for tests: a custom
// IAppAuth app, a deny-all upgrade, a DstackApp V2 and a DstackKms V2 (code keywarden does not know).
const DEPLOYABLE = [
  "DstackKms",
  "DstackApp",
  "ERC1967Proxy",
  "AllowListAppAuth",
  "DenyAllApp",
  "DstackAppV2",
  "DstackKmsV2",
];
// Contracts whose ABI is written to contracts-abi/.
const ABI_EXPORTS = ["DstackKms", "DstackApp"];
// ABIs extracted from npm packages: [output name, package-relative artifact path].
const EXTRACTED = [
  ["SafeL2", "@safe-global/safe-contracts/build/artifacts/contracts/SafeL2.sol/SafeL2.json"],
  ["MultiSend", "@safe-global/safe-contracts/build/artifacts/contracts/libraries/MultiSend.sol/MultiSend.json"],
  ["TimelockController", "@openzeppelin/contracts/build/contracts/TimelockController.json"],
];

function fail(msg) {
  console.error(`build.mjs: ${msg}`);
  process.exit(1);
}

function loadSolc() {
  let solc;
  try {
    solc = require("solc");
  } catch {
    fail("the npm package `solc` is missing: run `npm ci --ignore-scripts --no-audit --no-fund` first");
  }
  const v = solc.version();
  if (!v.startsWith(`${SOLC_VERSION}+`)) {
    fail(`expected solc ${SOLC_VERSION}, found ${v}: run npm ci`);
  }
  return solc;
}

function compile(solc) {
  const srcDir = join(here, "src");
  const files = readdirSync(srcDir).filter((f) => f.endsWith(".sol")).sort();
  const sources = {};
  for (const f of files) {
    sources[`contracts/src/${f}`] = { content: readFileSync(join(srcDir, f), "utf8") };
  }
  const input = {
    language: "Solidity",
    sources,
    settings: {
      evmVersion: EVM_VERSION,
      optimizer: { enabled: true, runs: 200 },
      metadata: { appendCBOR: false, bytecodeHash: "none" },
      outputSelection: {
        "*": {
          "*": [
            "abi",
            "evm.bytecode.object",
            "evm.deployedBytecode.object",
            "evm.deployedBytecode.immutableReferences",
            "storageLayout",
          ],
        },
      },
    },
  };
  const output = JSON.parse(solc.compile(JSON.stringify(input)));
  const diagnostics = output.errors ?? [];
  for (const d of diagnostics) {
    console.error(d.formattedMessage ?? d.message);
  }
  if (diagnostics.some((d) => d.severity === "error")) {
    fail("compilation failed");
  }
  const byName = {};
  for (const [unit, contracts] of Object.entries(output.contracts ?? {})) {
    for (const [name, c] of Object.entries(contracts)) {
      if (byName[name]) fail(`two contracts named ${name} (${byName[name].unit}, ${unit})`);
      byName[name] = { unit, ...c };
    }
  }
  return { version: solc.version(), byName };
}

// Keys of plain objects sorted recursively, array order kept: stable output.
function canonical(value) {
  if (Array.isArray(value)) return value.map(canonical);
  if (value && typeof value === "object") {
    const out = {};
    for (const k of Object.keys(value).sort()) out[k] = canonical(value[k]);
    return out;
  }
  return value;
}

// Every immutable's byte ranges in the runtime code, sorted by offset.
function immutableRanges(refs) {
  return Object.values(refs ?? {})
    .flat()
    .map((r) => [r.start, r.length])
    .sort((a, b) => a[0] - b[0]);
}

function json(value) {
  return JSON.stringify(value, null, 2) + "\n";
}

function outputs() {
  const solc = loadSolc();
  const { version, byName } = compile(solc);
  const files = new Map();
  for (const name of DEPLOYABLE) {
    const c = byName[name];
    if (!c) fail(`contract ${name} not found in contracts/src`);
    files.set(
      `contracts/out/${name}.json`,
      json({
        contractName: name,
        compiler: `solc ${version} evm=${EVM_VERSION} optimizer=200`,
        abi: canonical(c.abi),
        bytecode: `0x${c.evm.bytecode.object}`,
        deployedBytecode: `0x${c.evm.deployedBytecode.object}`,
        immutableReferences: immutableRanges(c.evm.deployedBytecode.immutableReferences),
        storageLayout: (c.storageLayout?.storage ?? []).map((v) => ({
          label: v.label,
          offset: v.offset,
          slot: v.slot,
        })),
      }),
    );
  }
  for (const name of ABI_EXPORTS) {
    files.set(`contracts-abi/${name}.json`, json(canonical(byName[name].abi)));
  }
  for (const [name, artifact] of EXTRACTED) {
    let path;
    try {
      path = require.resolve(artifact);
    } catch {
      fail(`${artifact} is missing: run \`npm ci --ignore-scripts --no-audit --no-fund\` first`);
    }
    const abi = JSON.parse(readFileSync(path, "utf8")).abi;
    if (!Array.isArray(abi)) fail(`${artifact} has no abi array`);
    files.set(`contracts-abi/${name}.json`, json(canonical(abi)));
  }
  return files;
}

const check = process.argv.includes("--check");
const files = outputs();
if (check) {
  const stale = [];
  for (const [rel, content] of files) {
    const abs = join(root, rel);
    if (!existsSync(abs) || readFileSync(abs, "utf8") !== content) stale.push(rel);
  }
  if (stale.length > 0) {
    for (const rel of stale) console.error(`stale: ${rel}`);
    fail(`${stale.length} generated file(s) out of date: run \`node contracts/build.mjs\` and commit`);
  }
  console.log(`build.mjs: ${files.size} generated files up to date`);
} else {
  for (const [rel, content] of files) {
    const abs = join(root, rel);
    mkdirSync(dirname(abs), { recursive: true });
    writeFileSync(abs, content);
    console.log(`wrote ${relative(root, abs)}`);
  }
}
