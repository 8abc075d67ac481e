// Oracle for tests/test_payout.py: runs @openzeppelin/merkle-tree's StandardMerkleTree on cases
// read as JSON from stdin and prints its results as JSON on stdout. Many cases per launch, so the
// Python tests start node only a few times.
//
// Input:  {"cases": [{"entries": [[address, amount], ...], "multiproofs": [[index, ...], ...],
//                     "options": {"sortLeaves": bool} (optional, StandardMerkleTree.of options),
//                     "ours": {"dump": {...}, "proofs": [[hex, ...], ...],
//                              "multiproofs": [{"leaves", "proof", "proofFlags"}, ...]}}]}
//         ("ours" is optional: our Python results, to be loaded and verified by OZ.)
// Output: {"cases": [{"root", "proofs", "multiproofs", "dump", "ours": {"loadedRoot",
//          "treeVerify": [bool], "staticVerify": [bool], "multiVerify": [bool]}} or {"error"}]}
import pkg from "@openzeppelin/merkle-tree";

const { StandardMerkleTree } = pkg;
const ENCODING = ["address", "uint256"];

function readStdin() {
  return new Promise((resolve, reject) => {
    const chunks = [];
    process.stdin.on("data", (c) => chunks.push(c));
    process.stdin.on("end", () => resolve(Buffer.concat(chunks).toString("utf8")));
    process.stdin.on("error", reject);
  });
}

function checkOurs(ours) {
  const loaded = StandardMerkleTree.load(ours.dump);
  const values = ours.dump.values.map((v) => v.value);
  return {
    loadedRoot: loaded.root,
    treeVerify: ours.proofs.map((p, i) => loaded.verify(i, p)),
    staticVerify: ours.proofs.map((p, i) =>
      StandardMerkleTree.verify(loaded.root, ENCODING, values[i], p)),
    multiVerify: (ours.multiproofs ?? []).map((mp) =>
      StandardMerkleTree.verifyMultiProof(loaded.root, ENCODING, mp)),
  };
}

function runCase(c) {
  try {
    const out = {};
    if (c.entries) {
      const tree = StandardMerkleTree.of(c.entries, ENCODING, c.options ?? {});
      out.root = tree.root;
      out.proofs = c.entries.map((_, i) => tree.getProof(i));
      out.multiproofs = (c.multiproofs ?? []).map((ix) => tree.getMultiProof(ix));
      out.dump = tree.dump();
    }
    if (c.ours) {
      out.ours = checkOurs(c.ours);
    }
    return out;
  } catch (e) {
    return { error: String(e && e.message ? e.message : e) };
  }
}

const input = JSON.parse(await readStdin());
process.stdout.write(JSON.stringify({ cases: input.cases.map(runCase) }));
