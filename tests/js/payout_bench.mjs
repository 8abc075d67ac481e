// Timing peer for benchmarks/payout_bench.py: builds StandardMerkleTree.of(entries,
// ["address","uint256"]) `repeats` times on entries read as JSON from stdin and prints the
// per-run milliseconds measured inside node (process start and JSON parsing excluded) and the root.
// Input: {"entries": [[address, amount], ...], "repeats": n}
import pkg from "@openzeppelin/merkle-tree";
import { performance } from "node:perf_hooks";

const { StandardMerkleTree } = pkg;

const chunks = [];
for await (const c of process.stdin) chunks.push(c);
const input = JSON.parse(Buffer.concat(chunks).toString("utf8"));

const times = [];
let root = null;
for (let r = 0; r < input.repeats; r++) {
  const t0 = performance.now();
  const tree = StandardMerkleTree.of(input.entries, ["address", "uint256"]);
  times.push(performance.now() - t0);
  root = tree.root;
}
process.stdout.write(JSON.stringify({ ms: times, root }));
