// Regenerates artifacts.json, baseline/ and test/artifacts.json (ABI + bytecode) from the sources.
//
//   node rewards/contracts/compile.mjs            write every artifact file
//   node rewards/contracts/compile.mjs --stdout --only=artifacts.json   print one artifact instead
//                                                (the test compares it with the committed file)
//
// The compiler is the npm `solc` pinned in package.json; imports resolve from node_modules only,
// so the output depends on nothing but the pinned packages and these sources. evmVersion is pinned
// to prague because solc 0.8.37 defaults to osaka, which py-evm (eth-tester) does not run.
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, "..", "..");
const require = createRequire(path.join(repo, "package.json"));
const solc = require("solc");

// Each artifact file lists the sources it holds; baseline/ is a benchmark-only comparison contract,
// test/ holds contracts only the tests deploy.
const TARGETS = {
  "artifacts.json": ["VeritrainSettlement.sol", "RewardToken.sol"],
  "baseline/artifacts.json": ["baseline/BitmapDistributor.sol"],
  "test/artifacts.json": ["test/ReentrantToken.sol"],
};
const SETTINGS = {
  evmVersion: "prague",
  optimizer: { enabled: true, runs: 10000 },
  viaIR: false,
  metadata: { bytecodeHash: "ipfs" },
  outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
};

function findImport(name) {
  // Only node_modules, and only paths that stay inside it.
  const full = path.resolve(repo, "node_modules", name);
  if (!full.startsWith(path.join(repo, "node_modules") + path.sep)) {
    return { error: `import outside node_modules: ${name}` };
  }
  try {
    return { contents: fs.readFileSync(full, "utf8") };
  } catch {
    return { error: `not found in node_modules: ${name}` };
  }
}

function compile(sources) {
  const input = {
    language: "Solidity",
    sources: Object.fromEntries(
      sources.map((f) => [f, { content: fs.readFileSync(path.join(here, f), "utf8") }]),
    ),
    settings: SETTINGS,
  };
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImport }));
  const errors = (output.errors ?? []).filter((e) => e.severity === "error");
  // 2394 is solc's generic note on transient storage; ReentrancyGuardTransient clears its slot on
  // every exit, the safe use the note itself names.
  for (const e of output.errors ?? []) {
    if (e.errorCode !== "2394") process.stderr.write(e.formattedMessage + "\n");
  }
  if (errors.length > 0) process.exit(1);
  const contracts = {};
  for (const file of sources) {
    const name = path.basename(file, ".sol");
    const c = output.contracts[file][name];
    contracts[name] = {
      abi: c.abi,
      bytecode: "0x" + c.evm.bytecode.object,
      deployedBytecode: "0x" + c.evm.deployedBytecode.object,
    };
  }
  const artifact = {
    format: "veritrain-contracts-v1",
    compiler: { name: "solc", version: solc.version() },
    settings: { evmVersion: SETTINGS.evmVersion, optimizer: SETTINGS.optimizer, viaIR: SETTINGS.viaIR },
    contracts,
  };
  return JSON.stringify(artifact, null, 1) + "\n";
}

const only = process.argv.find((a) => a.startsWith("--only="))?.slice("--only=".length);
for (const [file, sources] of Object.entries(TARGETS)) {
  if (only !== undefined && only !== file) continue;
  const text = compile(sources);
  if (process.argv.includes("--stdout")) {
    process.stdout.write(text);
    continue;
  }
  const target = path.join(here, file);
  const tmp = target + ".tmp";
  fs.writeFileSync(tmp, text);
  fs.renameSync(tmp, target); // atomic: a failed run never leaves half an artifact
  process.stderr.write(`wrote ${path.relative(repo, target)} (solc ${solc.version()})\n`);
}
