// Regenerates tests/vectors/payout/*.json from @openzeppelin/merkle-tree 1.0.8, so the expected
// roots, proofs, multiproofs and dumps come from OpenZeppelin, not from veritrain's Python code.
// Inputs are deterministic (sha256 of fixed labels). Addresses are written in EIP-55 case,
// computed here independently of veritrain.
// Usage (repository root): node tests/js/make_payout_vectors.mjs
import pkg from "@openzeppelin/merkle-tree";
import { keccak256 } from "ethereum-cryptography/keccak.js";
import { createHash } from "node:crypto";
import { writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const { StandardMerkleTree } = pkg;
const ENCODING = ["address", "uint256"];
const OUT = join(dirname(fileURLToPath(import.meta.url)), "..", "vectors", "payout");
const MAX = (1n << 256n) - 1n;

const sha = (label) => createHash("sha256").update(label).digest();

function checksum(hex40) {
  const lower = hex40.toLowerCase();
  const digest = Buffer.from(keccak256(Buffer.from(lower, "ascii"))).toString("hex");
  let out = "0x";
  for (let i = 0; i < 40; i++) {
    out += parseInt(digest[i], 16) >= 8 ? lower[i].toUpperCase() : lower[i];
  }
  return out;
}

const address = (label) => checksum(sha(`address:${label}`).subarray(0, 20).toString("hex"));
const amount = (label, bits) =>
  (BigInt("0x" + sha(`amount:${label}`).toString("hex")) >> BigInt(256 - bits)).toString();

function randomEntries(name, size) {
  return Array.from({ length: size }, (_, i) => [address(`${name}:${i}`), amount(`${name}:${i}`, 96)]);
}

function indexSets(name, size) {
  const all = Array.from({ length: size }, (_, i) => i);
  const picked = all.filter((i) => sha(`pick:${name}:${i}`)[0] < 100);
  const sets = [[0], all, picked.length ? picked : [size - 1]];
  if (size > 1) sets.push([size - 1, 0]);
  return sets;
}

function makeVector(name, description, entries) {
  const tree = StandardMerkleTree.of(entries, ENCODING);
  const dump = tree.dump();
  const multiproofs = indexSets(name, entries.length).map((indices) => ({
    indices,
    ...tree.getMultiProof(indices),
  }));
  const vector = {
    version: 1,
    description,
    generator: "@openzeppelin/merkle-tree 1.0.8 StandardMerkleTree.of (tests/js/make_payout_vectors.mjs)",
    leafEncoding: ENCODING,
    entries,
    leafHashes: dump.values.map((v) => dump.tree[v.treeIndex]),
    root: tree.root,
    proofs: entries.map((_, i) => tree.getProof(i)),
    multiproofs,
    dump,
  };
  writeFileSync(join(OUT, `${name}.json`), JSON.stringify(vector, null, 2) + "\n");
}

const spec = [
  "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
  "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
  "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
  "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
];
makeVector("single", "one entry: the root is the leaf hash, the proof is empty", [[spec[0], "1000"]]);
for (const size of [2, 3, 4, 5, 7, 8]) {
  makeVector(`size_${size}`, `${size} deterministic entries`, randomEntries(`size_${size}`, size));
}
makeVector("size_33", "33 entries: a tree one leaf past a power of two", randomEntries("size_33", 33));
makeVector("duplicates", "an exact duplicate entry and one account paid twice: OZ keeps every leaf", [
  [spec[1], "5"],
  [spec[2], "7"],
  [spec[1], "5"],
  [spec[2], "8"],
  [spec[3], "9"],
]);
makeVector("extremes", "zero and max uint256 amounts, the zero and all-ones addresses", [
  ["0x0000000000000000000000000000000000000000", "0"],
  [checksum("ff".repeat(20)), MAX.toString()],
  [spec[0], "1"],
  [spec[3], (MAX - 1n).toString()],
]);
