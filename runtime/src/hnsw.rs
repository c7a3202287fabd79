//! A hierarchical navigable small-world graph (Malkov & Yashunin, 2016)
//! over unit vectors, scored by their dot product (the cosine).
//!
//! Written here rather than taken from crates.io: in one run on the same
//! 10,000 MiniLM-sized vectors, `hnsw_rs` searched 3-5x and `usearch` 1.5-2x
//! slower than faiss's `IndexHNSWFlat` at equal recall (docs/rag.md), and
//! neither rebuilds the same graph after a reload, which an index resumed
//! with `--add` needs. Here a point's level is a hash of its number, and
//! points go in in groups of GROUP consecutive numbers, each group's
//! highest levels first (`add`), so the graph is a function of the vectors
//! and of where builds ended: saving it part way (whole groups) and adding
//! the rest gives the graph of one uninterrupted build.
//!
//! Layout: the vectors are rows of one array (they live in the index's
//! `vectors.f32`); layer 0 keeps `2m` neighbour slots per point, each upper
//! layer `m`, in flat `u32` arrays (`NONE` marks an empty slot).

use std::collections::BinaryHeap;

const NONE: u32 = u32::MAX;
const MAGIC: &[u8; 8] = b"MCHNSW01";
const MAX_LEVEL: usize = 16;
/// Points linked as a group: consecutive numbers up to a multiple of this.
/// Large, so that a corpus of up to this many passages is linked in one
/// group, all its hubs first: groups of 1,024 gave recall@10 0.865 at ef 16
/// on 12,024 passages, one group 0.877. Linking waits for a whole group
/// only in a build still adding; one that ends links its last group, and
/// a search opening an unfinished index links it in memory (16,384
/// points: ~6 s).
const GROUP: usize = 16384;

#[derive(Debug)]
pub struct Hnsw {
    dim: usize,
    m: usize,
    ef_construction: usize,
    levels: Vec<u8>,
    /// `2m` slots per point.
    links0: Vec<u32>,
    /// Per point, `m` slots for each of its levels above 0 (`upper_at[i]` is where they start).
    upper: Vec<u32>,
    upper_at: Vec<usize>,
    entry: Option<u32>,
    /// GROUP (smaller in tests).
    group: usize,
}

/// Scratch space of one searcher: a visited mark per point, a byte (12 KB
/// for 12,000 points, in the level-1 cache), cleared every 255 searches;
/// the neighbours to score next and their distances.
#[derive(Default)]
pub struct Scratch {
    marks: Vec<u8>,
    epoch: u8,
    fresh: Vec<u32>,
    distances: Vec<f32>,
}

impl Scratch {
    fn start(&mut self, n: usize) {
        if self.marks.len() < n {
            self.marks.resize(n, 0);
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.marks.fill(0);
            self.epoch = 1;
        }
    }

    /// Marks `i`; false when it was marked already.
    fn visit(&mut self, i: u32) -> bool {
        let mark = &mut self.marks[i as usize];
        let fresh = *mark != self.epoch;
        *mark = self.epoch;
        fresh
    }
}

/// A point and its distance (1 - cosine) to the query, ordered by distance.
#[derive(Clone, Copy, PartialEq)]
struct Near {
    distance: f32,
    id: u32,
}

impl Eq for Near {}
impl PartialOrd for Near {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Near {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.distance.total_cmp(&other.distance).then(self.id.cmp(&other.id))
    }
}

impl Hnsw {
    pub fn new(dim: usize, m: usize, ef_construction: usize) -> Hnsw {
        Hnsw {
            dim,
            m,
            ef_construction,
            levels: Vec::new(),
            links0: Vec::new(),
            upper: Vec::new(),
            upper_at: Vec::new(),
            entry: None,
            group: GROUP,
        }
    }

    pub fn len(&self) -> usize {
        self.levels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.levels.is_empty()
    }

    pub fn m(&self) -> usize {
        self.m
    }

    pub fn ef_construction(&self) -> usize {
        self.ef_construction
    }

    /// The level of point `i`: geometric with ratio 1/m, from a hash of `i`.
    fn level_of(&self, i: usize) -> usize {
        let u = (splitmix64(i as u64 ^ 0x6d6f_6465_6c63) >> 11) as f64 / (1u64 << 53) as f64;
        let scale = 1.0 / (self.m as f64).ln();
        ((-(1.0 - u).ln() * scale) as usize).min(MAX_LEVEL)
    }

    fn links(&self, i: u32, level: usize) -> &[u32] {
        let i = i as usize;
        if level == 0 {
            &self.links0[i * 2 * self.m..(i + 1) * 2 * self.m]
        } else {
            let at = self.upper_at[i] + (level - 1) * self.m;
            &self.upper[at..at + self.m]
        }
    }

    /// The links of `i` on `level`, the empty slots (all at the end) left off.
    fn linked(&self, i: u32, level: usize) -> &[u32] {
        let links = self.links(i, level);
        &links[..links.iter().position(|&n| n == NONE).unwrap_or(links.len())]
    }

    fn links_mut(&mut self, i: u32, level: usize) -> &mut [u32] {
        let i = i as usize;
        if level == 0 {
            &mut self.links0[i * 2 * self.m..(i + 1) * 2 * self.m]
        } else {
            let at = self.upper_at[i] + (level - 1) * self.m;
            &mut self.upper[at..at + self.m]
        }
    }

    fn top(&self) -> usize {
        self.entry.map_or(0, |e| self.levels[e as usize] as usize)
    }

    /// Links the rows of `vectors` the graph does not have yet, in groups
    /// that end at multiples of GROUP, each group's points highest level
    /// first (ties in the order of a hash), as faiss inserts: the upper
    /// layers' hubs are in place before the points that link through them
    /// (recall@10 at ef 16 on 12,024 MiniLM passages 0.852 -> 0.877, faiss
    /// 0.883; in number order the graph was as hnswlib's). `whole`: whole
    /// groups only, leaving the last, partial, one to a later call (a build
    /// that is still adding points).
    pub fn add(&mut self, vectors: &[f32], whole: bool, scratch: &mut Scratch) {
        let rows = vectors.len() / self.dim;
        let end = if whole { rows / self.group * self.group } else { rows };
        while self.len() < end {
            let (first, last) = (self.len(), ((self.len() / self.group + 1) * self.group).min(end));
            while self.len() < last {
                self.reserve();
            }
            let mut order: Vec<u32> = (first as u32..last as u32).collect();
            order.sort_by_key(|&i| (std::cmp::Reverse(self.levels[i as usize]), splitmix64(i as u64)));
            for id in order {
                self.link(vectors, id, scratch);
            }
        }
    }

    /// Slots for the next point, with no links yet.
    fn reserve(&mut self) -> u32 {
        let id = self.len() as u32;
        let level = self.level_of(id as usize);
        self.levels.push(level as u8);
        self.links0.extend(std::iter::repeat_n(NONE, 2 * self.m));
        self.upper_at.push(self.upper.len());
        self.upper.extend(std::iter::repeat_n(NONE, level * self.m));
        id
    }

    /// Links point `id` (row `id` of `vectors`) into the graph.
    fn link(&mut self, vectors: &[f32], id: u32, scratch: &mut Scratch) {
        let level = self.levels[id as usize] as usize;
        let Some(mut entry) = self.entry else {
            self.entry = Some(id);
            return;
        };
        let q = row(vectors, self.dim, id);
        let top = self.top();
        for l in (level + 1..=top).rev() {
            entry = self.greedy(vectors, q, entry, l, scratch);
        }
        let mut entries = vec![entry];
        for l in (0..=level.min(top)).rev() {
            let found = self.search_layer(vectors, q, &entries, self.ef_construction, l, scratch);
            let width = if l == 0 { 2 * self.m } else { self.m };
            let chosen = self.select(vectors, &found, width);
            for (slot, n) in self.links_mut(id, l).iter_mut().zip(&chosen) {
                *slot = n.id;
            }
            for n in &chosen {
                self.connect(vectors, n.id, id, n.distance, l, width);
            }
            entries = found.iter().map(|n| n.id).collect();
        }
        if level > top {
            self.entry = Some(id);
        }
    }

    /// Links `from` to `to` on layer `l`; a full list keeps the heuristic's choice.
    fn connect(&mut self, vectors: &[f32], from: u32, to: u32, distance: f32, l: usize, width: usize) {
        let links = self.links_mut(from, l);
        if let Some(slot) = links.iter_mut().find(|s| **s == NONE) {
            *slot = to;
            return;
        }
        let mut distances = Vec::new();
        self.distances(vectors, row(vectors, self.dim, from), self.links(from, l), &mut distances);
        let mut candidates: Vec<Near> = (self.links(from, l).iter().zip(distances))
            .map(|(&id, distance)| Near { distance, id })
            .chain([Near { distance, id: to }])
            .collect();
        candidates.sort();
        let kept = self.select(vectors, &candidates, width);
        let links = self.links_mut(from, l);
        links.fill(NONE);
        for (slot, n) in links.iter_mut().zip(&kept) {
            *slot = n.id;
        }
    }

    /// The heuristic of the paper (its algorithm 4): from candidates sorted
    /// nearest first, keep one only when it is nearer the query than to
    /// every kept one, so that links spread in all directions.
    fn select(&self, vectors: &[f32], sorted: &[Near], width: usize) -> Vec<Near> {
        let mut kept: Vec<Near> = Vec::with_capacity(width);
        for &c in sorted {
            if kept.len() == width {
                break;
            }
            let v = row(vectors, self.dim, c.id);
            if kept.iter().all(|k| 1.0 - dot(v, row(vectors, self.dim, k.id)) > c.distance) {
                kept.push(c);
            }
        }
        kept
    }

    fn greedy(&self, vectors: &[f32], q: &[f32], mut at: u32, l: usize, scratch: &mut Scratch) -> u32 {
        let mut best = 1.0 - dot(q, row(vectors, self.dim, at));
        loop {
            let links = self.linked(at, l);
            self.distances(vectors, q, links, &mut scratch.distances);
            let mut moved = false;
            for (&n, &d) in links.iter().zip(&scratch.distances) {
                if d < best {
                    (best, at, moved) = (d, n, true);
                }
            }
            if !moved {
                return at;
            }
        }
    }

    /// 1 - cosine from `q` to each of `ids` into `out`, four rows at a time.
    fn distances(&self, vectors: &[f32], q: &[f32], ids: &[u32], out: &mut Vec<f32>) {
        out.clear();
        let row = |i: u32| row(vectors, self.dim, i);
        let mut quads = ids.chunks_exact(4);
        for quad in &mut quads {
            let d = dots(q, [row(quad[0]), row(quad[1]), row(quad[2]), row(quad[3])]);
            out.extend(d.map(|d| 1.0 - d));
        }
        out.extend(quads.remainder().iter().map(|&i| 1.0 - dot(q, row(i))));
    }

    /// The `ef` nearest points to `q` on layer `l` reachable from `entries`, nearest first.
    fn search_layer(
        &self,
        vectors: &[f32],
        q: &[f32],
        entries: &[u32],
        ef: usize,
        l: usize,
        scratch: &mut Scratch,
    ) -> Vec<Near> {
        scratch.start(self.len());
        let mut candidates: BinaryHeap<std::cmp::Reverse<Near>> = BinaryHeap::with_capacity(ef * 2);
        let mut found: BinaryHeap<Near> = BinaryHeap::with_capacity(ef + 1);
        for &e in entries {
            if scratch.visit(e) {
                let n = Near { distance: 1.0 - dot(q, row(vectors, self.dim, e)), id: e };
                candidates.push(std::cmp::Reverse(n));
                found.push(n);
            }
        }
        while found.len() > ef {
            found.pop();
        }
        while let Some(std::cmp::Reverse(c)) = candidates.pop() {
            if found.len() >= ef && c.distance > found.peek().map_or(f32::INFINITY, |f| f.distance) {
                break;
            }
            // The neighbours not seen yet, scored together.
            scratch.fresh.clear();
            for &n in self.linked(c.id, l) {
                if scratch.visit(n) {
                    scratch.fresh.push(n);
                }
            }
            self.distances(vectors, q, &scratch.fresh, &mut scratch.distances);
            for (&n, &d) in scratch.fresh.iter().zip(&scratch.distances) {
                if found.len() < ef || d < found.peek().map_or(f32::INFINITY, |f| f.distance) {
                    let near = Near { distance: d, id: n };
                    candidates.push(std::cmp::Reverse(near));
                    // Full: the new point takes the farthest one's place (one sift).
                    if found.len() < ef {
                        found.push(near);
                    } else if let Some(mut farthest) = found.peek_mut() {
                        *farthest = near;
                    }
                }
            }
        }
        found.into_sorted_vec()
    }

    /// The `k` rows of `vectors` most similar to `q` (cosine, highest
    /// first), searching with a list of `ef`.
    pub fn search(&self, vectors: &[f32], q: &[f32], k: usize, ef: usize, scratch: &mut Scratch) -> Vec<(u32, f32)> {
        let Some(mut entry) = self.entry else { return Vec::new() };
        for l in (1..=self.top()).rev() {
            entry = self.greedy(vectors, q, entry, l, scratch);
        }
        let found = self.search_layer(vectors, q, &[entry], ef.max(k), 0, scratch);
        found.into_iter().take(k).map(|n| (n.id, 1.0 - n.distance)).collect()
    }

    /// The graph as bytes (the vectors are not in it).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.levels.len() + 4 * (self.links0.len() + self.upper.len()));
        out.extend_from_slice(MAGIC);
        for v in [self.dim, self.m, self.ef_construction, self.len()] {
            out.extend_from_slice(&(v as u64).to_le_bytes());
        }
        out.extend_from_slice(&self.levels);
        for v in self.links0.iter().chain(&self.upper) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Reads [`Hnsw::to_bytes`]'s output, checking every size and link.
    pub fn from_bytes(bytes: &[u8]) -> Result<Hnsw, String> {
        let damaged = |what: &str| format!("the graph is damaged ({what})");
        if bytes.len() < 40 || &bytes[..8] != MAGIC {
            return Err(damaged("no header"));
        }
        let word = |i: usize| u64::from_le_bytes(bytes[8 + 8 * i..16 + 8 * i].try_into().expect("8 bytes"));
        let size = |i: usize| usize::try_from(word(i)).map_err(|_| damaged("a size too large"));
        let (dim, m, ef_construction, n) = (size(0)?, size(1)?, size(2)?, size(3)?);
        if !(2..=1024).contains(&m) || dim == 0 {
            return Err(damaged("its settings"));
        }
        let levels = bytes.get(40..).and_then(|b| b.get(..n)).ok_or_else(|| damaged("cut short"))?.to_vec();
        if levels.iter().any(|&l| l as usize > MAX_LEVEL) {
            return Err(damaged("a level out of range"));
        }
        let slots0 = n.checked_mul(2 * m).ok_or_else(|| damaged("a size too large"))?;
        let upper_slots: usize = levels.iter().map(|&l| l as usize * m).sum();
        let words = &bytes[40 + n..];
        if words.len() != 4 * (slots0 + upper_slots) {
            return Err(damaged("its length"));
        }
        let all: Vec<u32> = words.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        if all.iter().any(|&v| v != NONE && v as usize >= n) {
            return Err(damaged("a link to no point"));
        }
        let (links0, upper) = (all[..slots0].to_vec(), all[slots0..].to_vec());
        let mut upper_at = Vec::with_capacity(n);
        let mut at = 0;
        for &l in &levels {
            upper_at.push(at);
            at += l as usize * m;
        }
        let mut graph = Hnsw { dim, m, ef_construction, levels, links0, upper, upper_at, entry: None, group: GROUP };
        // The entry is the first point of the highest level, as insertion leaves it.
        let top = graph.levels.iter().copied().max();
        graph.entry = top.and_then(|t| graph.levels.iter().position(|&l| l == t)).map(|i| i as u32);
        Ok(graph)
    }

    pub fn dim(&self) -> usize {
        self.dim
    }
}

fn row(vectors: &[f32], dim: usize, i: u32) -> &[f32] {
    &vectors[i as usize * dim..(i as usize + 1) * dim]
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The dot product of `a` and `b`; the same bits as `dots` gives each row.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dots(a, [b])[0]
}

/// The dot product of `q` with every row of `vectors`, four rows at a time.
pub fn dot_rows(q: &[f32], vectors: &[f32]) -> Vec<f32> {
    if q.is_empty() {
        return Vec::new();
    }
    let mut quads = vectors.chunks_exact(4 * q.len());
    let mut out = Vec::with_capacity(vectors.len() / q.len());
    for quad in &mut quads {
        let (a, rest) = quad.split_at(q.len());
        let (b, rest) = rest.split_at(q.len());
        let (c, d) = rest.split_at(q.len());
        out.extend(dots(q, [a, b, c, d]));
    }
    out.extend(quads.remainder().chunks_exact(q.len()).map(|r| dot(q, r)));
    out
}

/// The dot products of `q` with N rows at once, their loads interleaved:
/// a search reads most rows from L3 or memory, and four rows' misses in
/// flight together beat prefetching rows and reading them one at a time
/// (12,024 MiniLM passages, Zen 3, ef 64: 73.8 -> 60 us a query; faiss
/// batches its distances by four for the same reason). Each row's sum is
/// LANES partial sums added as a tree, then the tail, in every path.
#[inline]
pub fn dots<const N: usize>(q: &[f32], rows: [&[f32]; N]) -> [f32; N] {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { dots_avx2(q, rows) };
    }
    dots_lanes(q, rows)
}

const LANES: usize = 16;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dots_avx2<const N: usize>(q: &[f32], rows: [&[f32]; N]) -> [f32; N] {
    use std::arch::x86_64::{__m256, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps};
    assert!(rows.iter().all(|r| r.len() == q.len()), "rows as long as the query");
    let body = q.len() / LANES * LANES;
    let mut acc = [[_mm256_setzero_ps(); 2]; N];
    for c in (0..body).step_by(LANES) {
        // SAFETY: c + LANES <= body <= the length of q and of every row.
        unsafe {
            let (x0, x1) = (_mm256_loadu_ps(q.as_ptr().add(c)), _mm256_loadu_ps(q.as_ptr().add(c + 8)));
            for (a, r) in acc.iter_mut().zip(&rows) {
                a[0] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(r.as_ptr().add(c)), a[0]);
                a[1] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(r.as_ptr().add(c + 8)), a[1]);
            }
        }
    }
    // SAFETY: two vectors of 8 f32 are 16 f32, lanes 0-7 then 8-15.
    let lanes = acc.map(|a| unsafe { std::mem::transmute::<[__m256; 2], [f32; LANES]>(a) });
    let mut out = [0.0; N];
    for ((o, lanes), r) in out.iter_mut().zip(lanes).zip(rows) {
        *o = tree_sum(lanes) + tail(q, r, body);
    }
    out
}

/// `dots` without SIMD, lane for lane the same arithmetic.
fn dots_lanes<const N: usize>(q: &[f32], rows: [&[f32]; N]) -> [f32; N] {
    let body = q.len() / LANES * LANES;
    let mut acc = [[0f32; LANES]; N];
    for (c, x) in q[..body].chunks_exact(LANES).enumerate() {
        for (a, r) in acc.iter_mut().zip(&rows) {
            for ((a, x), y) in a.iter_mut().zip(x).zip(&r[c * LANES..(c + 1) * LANES]) {
                *a = x.mul_add(*y, *a);
            }
        }
    }
    std::array::from_fn(|i| tree_sum(acc[i]) + tail(q, rows[i], body))
}

/// Partial sums added as a tree: a scalar chain would cost more than the products.
#[inline(always)]
fn tree_sum(mut lanes: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
        width /= 2;
    }
    lanes[0]
}

#[inline(always)]
fn tail(q: &[f32], r: &[f32], body: usize) -> f32 {
    q[body..].iter().zip(&r[body..]).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vectors(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut v: Vec<f32> =
            (0..n * dim).map(|i| (splitmix64(seed ^ i as u64) >> 40) as f32 / (1u64 << 24) as f32 - 0.5).collect();
        for r in v.chunks_exact_mut(dim) {
            let norm = dot(r, r).sqrt();
            r.iter_mut().for_each(|x| *x /= norm);
        }
        v
    }

    fn exact(v: &[f32], q: &[f32], dim: usize, k: usize) -> Vec<u32> {
        let mut all: Vec<(f32, u32)> = v.chunks_exact(dim).enumerate().map(|(i, r)| (-dot(q, r), i as u32)).collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0));
        all.into_iter().take(k).map(|x| x.1).collect()
    }

    #[test]
    fn every_path_sums_a_row_alike() {
        for dim in [1, 7, 16, 17, 40, 384, 385] {
            let v = vectors(5, dim, dim as u64);
            let rows: Vec<&[f32]> = v.chunks_exact(dim).collect();
            let one: Vec<f32> = rows.iter().map(|r| dot(rows[4], r)).collect();
            let four = dots(rows[4], [rows[0], rows[1], rows[2], rows[3]]);
            let lanes = dots_lanes(rows[4], [rows[0], rows[1], rows[2], rows[3]]);
            assert_eq!(one[..4], four, "dim {dim}");
            assert_eq!(four, lanes, "dim {dim}");
            assert_eq!(dot_rows(rows[4], &v), one, "dim {dim}");
            let exact: f64 = rows[4].iter().zip(rows[0]).map(|(&x, &y)| x as f64 * y as f64).sum();
            assert!((four[0] as f64 - exact).abs() < 1e-5, "dim {dim}: {} against {exact}", four[0]);
        }
    }

    #[test]
    fn finds_the_nearest_points() {
        let (n, dim) = (2000, 24);
        let v = vectors(n, dim, 1);
        let mut g = Hnsw::new(dim, 12, 100);
        let mut s = Scratch::default();
        g.add(&v, false, &mut s);
        let queries = vectors(100, dim, 2);
        let mut hits = 0;
        for q in queries.chunks_exact(dim) {
            let got: Vec<u32> = g.search(&v, q, 10, 64, &mut s).into_iter().map(|x| x.0).collect();
            let want = exact(&v, q, dim, 10);
            hits += got.iter().filter(|i| want.contains(i)).count();
            assert!(got.windows(2).all(|w| w[0] != w[1]));
        }
        assert!(hits >= 950, "recall@10 {}", hits as f64 / 1000.0);
        // A point is its own nearest neighbour.
        let top = g.search(&v, row(&v, dim, 7), 1, 32, &mut s);
        assert_eq!(top[0].0, 7);
        assert!((top[0].1 - 1.0).abs() < 1e-5);
    }

    #[test]
    fn a_graph_saved_part_way_and_finished_is_the_graph_of_one_build() {
        let (n, dim) = (2600, 16);
        let v = vectors(n, dim, 3);
        let mut s = Scratch::default();
        let group = 1024;
        let mut whole = Hnsw::new(dim, 8, 40);
        whole.group = group;
        whole.add(&v, false, &mut s);
        // A build that saved its graph with 1,500 of the points come: the
        // first group linked, the rest waiting for their group.
        let mut part = Hnsw::new(dim, 8, 40);
        part.group = group;
        part.add(&v[..1500 * dim], true, &mut s);
        assert_eq!(part.len(), group);
        let mut resumed = Hnsw::from_bytes(&part.to_bytes()).unwrap();
        resumed.group = group;
        resumed.add(&v[..2300 * dim], true, &mut s);
        resumed.add(&v, false, &mut s);
        assert_eq!(resumed.to_bytes(), whole.to_bytes());
        // Linked one by one, in number order, the graph is another one.
        let mut in_order = Hnsw::new(dim, 8, 40);
        for i in 1..=n {
            in_order.add(&v[..i * dim], false, &mut s);
        }
        assert_ne!(in_order.to_bytes(), whole.to_bytes());
    }

    #[test]
    fn damaged_graphs_are_refused() {
        let (n, dim) = (50, 8);
        let v = vectors(n, dim, 4);
        let mut g = Hnsw::new(dim, 4, 20);
        let mut s = Scratch::default();
        g.add(&v, false, &mut s);
        let bytes = g.to_bytes();
        assert!(Hnsw::from_bytes(&bytes[..bytes.len() - 3]).unwrap_err().contains("length"));
        assert!(Hnsw::from_bytes(&bytes[..20]).unwrap_err().contains("header"));
        let mut bad = bytes.clone();
        let last = bad.len() - 4;
        bad[last..].copy_from_slice(&(n as u32 + 5).to_le_bytes());
        assert!(Hnsw::from_bytes(&bad).unwrap_err().contains("link"));
        for cut in 0..bytes.len() {
            let _ = Hnsw::from_bytes(&bytes[..cut]);
        }
    }
}
