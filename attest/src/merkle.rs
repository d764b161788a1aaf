//! SHA-256 Merkle trees over TPM-fresh nonces: one TPM quote covers the root of a batch, and
//! each token carries its nonce's inclusion proof.
//!
//! Hashing is domain-separated (RFC 6962 style): a leaf is `SHA-256(0x00 || data)`, an inner
//! node `SHA-256(0x01 || left || right)`, so a leaf can never pass for a node. A level with an
//! odd number of nodes carries its last node up unchanged; the proof therefore names the number
//! of leaves, which fixes the tree's shape.

use alloc::vec;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use sha2::{Digest, Sha256};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// The most leaves a tree (one batch) may have; bounds proof length to 20 hashes.
pub const MAX_LEAVES: u32 = 1 << 20;

/// Hash of a leaf holding `data`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// Hash of an inner node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Errors building a tree or checking a proof.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MerkleError {
    /// No leaves.
    #[error("a Merkle tree needs at least one leaf")]
    Empty,
    /// Too many leaves.
    #[error("{0} leaves is over the limit of {MAX_LEAVES} per tree")]
    TooManyLeaves(usize),
    /// A proof's index is not inside its tree.
    #[error("proof index {index} is outside a tree of {leaves} leaves")]
    IndexOutOfRange { index: u32, leaves: u32 },
    /// A path entry is not 32 bytes.
    #[error("proof path entry {0} is not a 32-byte SHA-256 digest")]
    BadPathEntry(usize),
    /// The path is longer or shorter than the tree's shape needs.
    #[error(
        "proof path has {got} entries but a tree of {leaves} leaves needs {need} for index {index}"
    )]
    PathLength {
        got: usize,
        need: usize,
        leaves: u32,
        index: u32,
    },
    /// The proof leads to another root.
    #[error("inclusion proof does not lead to the expected root")]
    RootMismatch,
}

/// Proof that a leaf is in a tree: its index, the number of leaves, and the sibling hashes
/// from the leaf up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InclusionProof {
    /// Position of the leaf (0-based).
    pub index: u32,
    /// Number of leaves in the tree.
    pub leaves: u32,
    /// Sibling hashes, leaf level first.
    pub path: Vec<ByteBuf>,
}

/// A built tree: every level, leaves first.
#[derive(Debug, Clone)]
pub struct MerkleTree {
    levels: Vec<Vec<Hash>>,
}

impl MerkleTree {
    /// Builds the tree over `leaves` (each hashed with [`leaf_hash`]).
    pub fn build<T: AsRef<[u8]>>(leaves: &[T]) -> Result<MerkleTree, MerkleError> {
        Self::from_leaf_hashes(leaves.iter().map(|l| leaf_hash(l.as_ref())).collect())
    }

    /// Builds the tree over already-hashed leaves.
    pub fn from_leaf_hashes(leaves: Vec<Hash>) -> Result<MerkleTree, MerkleError> {
        if leaves.is_empty() {
            return Err(MerkleError::Empty);
        }
        if leaves.len() > MAX_LEAVES as usize {
            return Err(MerkleError::TooManyLeaves(leaves.len()));
        }
        let mut levels = vec![leaves];
        while let Some(top) = levels.last().filter(|l| l.len() > 1) {
            let next = top
                .chunks(2)
                .map(|p| match p {
                    [l, r] => node_hash(l, r),
                    [one] => *one,
                    _ => unreachable_pair(),
                })
                .collect();
            levels.push(next);
        }
        Ok(MerkleTree { levels })
    }

    /// The root hash.
    pub fn root(&self) -> Hash {
        self.levels
            .last()
            .and_then(|l| l.first())
            .copied()
            .unwrap_or_default()
    }

    /// Number of leaves.
    pub fn len(&self) -> usize {
        self.levels.first().map_or(0, Vec::len)
    }

    /// Whether the tree is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The inclusion proof of leaf `index`.
    pub fn proof(&self, index: usize) -> Result<InclusionProof, MerkleError> {
        let leaves = self.len() as u32;
        if index >= self.len() {
            return Err(MerkleError::IndexOutOfRange {
                index: index as u32,
                leaves,
            });
        }
        let mut path = Vec::new();
        let mut i = index;
        for level in &self.levels[..self.levels.len() - 1] {
            let sib = i ^ 1;
            if let Some(h) = level.get(sib) {
                path.push(ByteBuf::from(h.to_vec()));
            }
            i /= 2;
        }
        Ok(InclusionProof {
            index: index as u32,
            leaves,
            path,
        })
    }
}

/// `chunks(2)` never yields an empty or longer slice; kept total without a panic.
fn unreachable_pair() -> Hash {
    [0u8; 32]
}

impl InclusionProof {
    /// The root this proof leads to from a leaf holding `data`.
    pub fn root_for(&self, data: &[u8]) -> Result<Hash, MerkleError> {
        let (index, leaves) = (self.index, self.leaves);
        if leaves == 0 || leaves > MAX_LEAVES || index >= leaves {
            return Err(MerkleError::IndexOutOfRange { index, leaves });
        }
        let mut h = leaf_hash(data);
        let (mut i, mut n, mut k) = (index, leaves, 0usize);
        let mut need = 0usize;
        while n > 1 {
            let has_sibling = i % 2 == 1 || i + 1 < n;
            if has_sibling {
                need += 1;
                let sib: Hash = match self.path.get(k) {
                    Some(s) => s
                        .as_slice()
                        .try_into()
                        .map_err(|_| MerkleError::BadPathEntry(k))?,
                    None => {
                        return Err(MerkleError::PathLength {
                            got: self.path.len(),
                            need: need + path_rest(i / 2, n.div_ceil(2)),
                            leaves,
                            index,
                        })
                    }
                };
                h = if i % 2 == 1 {
                    node_hash(&sib, &h)
                } else {
                    node_hash(&h, &sib)
                };
                k += 1;
            }
            i /= 2;
            n = n.div_ceil(2);
        }
        if k != self.path.len() {
            return Err(MerkleError::PathLength {
                got: self.path.len(),
                need,
                leaves,
                index,
            });
        }
        Ok(h)
    }

    /// Checks that a leaf holding `data` is in the tree with `root`.
    pub fn verify(&self, data: &[u8], root: &[u8]) -> Result<(), MerkleError> {
        if self.root_for(data)?.as_slice() == root {
            Ok(())
        } else {
            Err(MerkleError::RootMismatch)
        }
    }
}

/// Siblings still needed above a node at `i` in a level of `n` nodes.
fn path_rest(mut i: u32, mut n: u32) -> usize {
    let mut need = 0;
    while n > 1 {
        if i % 2 == 1 || i + 1 < n {
            need += 1;
        }
        i /= 2;
        n = n.div_ceil(2);
    }
    need
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_leaf_root_is_its_leaf_hash_and_proof_is_empty() {
        let t = MerkleTree::build(&[b"n"]).unwrap();
        assert_eq!(t.root(), leaf_hash(b"n"));
        let p = t.proof(0).unwrap();
        assert!(p.path.is_empty());
        p.verify(b"n", &t.root()).unwrap();
    }

    #[test]
    fn three_leaves_match_the_definition() {
        let t = MerkleTree::build(&[b"a", b"b", b"c"]).unwrap();
        let ab = node_hash(&leaf_hash(b"a"), &leaf_hash(b"b"));
        assert_eq!(t.root(), node_hash(&ab, &leaf_hash(b"c")));
        let p = t.proof(2).unwrap();
        assert_eq!(p.path, vec![ByteBuf::from(ab.to_vec())]);
    }

    #[test]
    fn leaf_cannot_pass_for_node() {
        let t = MerkleTree::build(&[b"a", b"b"]).unwrap();
        let mut inner = leaf_hash(b"a").to_vec();
        inner.extend_from_slice(&leaf_hash(b"b"));
        let p = InclusionProof {
            index: 0,
            leaves: 1,
            path: vec![],
        };
        assert_eq!(p.verify(&inner, &t.root()), Err(MerkleError::RootMismatch));
    }

    #[test]
    fn empty_and_bad_proofs_are_errors() {
        assert_eq!(
            MerkleTree::build::<&[u8]>(&[]).err(),
            Some(MerkleError::Empty)
        );
        let t = MerkleTree::build(&[b"a", b"b", b"c", b"d"]).unwrap();
        assert!(matches!(
            t.proof(4),
            Err(MerkleError::IndexOutOfRange { .. })
        ));
        let mut p = t.proof(1).unwrap();
        p.path.push(ByteBuf::from(vec![0; 32]));
        assert!(matches!(
            p.verify(b"b", &t.root()),
            Err(MerkleError::PathLength { .. })
        ));
        let mut p = t.proof(1).unwrap();
        p.path[0] = ByteBuf::from(vec![0; 31]);
        assert_eq!(p.verify(b"b", &t.root()), Err(MerkleError::BadPathEntry(0)));
        let mut p = t.proof(1).unwrap();
        p.path.pop();
        assert!(matches!(
            p.verify(b"b", &t.root()),
            Err(MerkleError::PathLength {
                got: 1,
                need: 2,
                ..
            })
        ));
    }

    proptest! {
        #[test]
        fn every_leaf_proves_and_nothing_else_does(
            leaves in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..70),
            pick in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
        ) {
            let t = MerkleTree::build(&leaves).unwrap();
            let root = t.root();
            for (i, l) in leaves.iter().enumerate() {
                let p = t.proof(i).unwrap();
                prop_assert_eq!(p.verify(l, &root), Ok(()));
                let enc = crate::signed::to_cbor("proof", &p).unwrap();
                let back: InclusionProof = crate::signed::from_cbor("proof", &enc).unwrap();
                prop_assert_eq!(back, p);
            }
            let i = pick.index(leaves.len());
            let p = t.proof(i).unwrap();
            // Another datum does not prove at this position (unless it equals the leaf).
            let mut other = leaves[i].clone();
            other.push(0x55);
            prop_assert!(p.verify(&other, &root).is_err());
            // Any altered path byte breaks the proof.
            if !p.path.is_empty() {
                let mut bad = p.clone();
                let j = flip.index(bad.path.len());
                bad.path[j][0] ^= 1;
                prop_assert!(bad.verify(&leaves[i], &root).is_err());
            }
        }
    }
}
