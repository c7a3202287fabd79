//! Convolution (`conv1d`, `conv2d`) lowered as im2col: one `Gather` takes
//! every output position's window of input pixels, one product with the
//! kernel does the rest. Its gradient (a `ScatterAdd` of the windows' rows
//! and the product's) and every backend come with those two operations, and
//! the result is PyTorch's `F.conv*d`: stride, zero padding, dilation and
//! groups on each spatial axis. Windows that tile the input (ViT's patch
//! projection, 1 x 1 kernels) are a reshape and a permute instead.

use super::graph::{Binary, Graph, NodeId};
use crate::types::{DType, Dim};

/// How the kernel moves over each spatial axis, one entry per axis.
pub struct Geometry {
    pub stride: Vec<i64>,
    pub padding: Vec<i64>,
    pub dilation: Vec<i64>,
    pub groups: i64,
}

/// `x [B, C, *S]` convolved with `weight [O, C / groups, *K]` (plus
/// `bias [O]`) into `out [B, O, *P]`, the sizes the checker inferred.
///
/// The input is laid out channels last with one row of zeros appended per
/// image, `[B * (S + 1), C]`; window element k of output position p reads
/// row `b (S + 1) + flat(p stride + k dilation - padding)`, or the zero row
/// where that falls in the padding. The windows `[B, *P, *K, C]` then meet
/// the kernel, reordered to `[O, *K, C / groups]`, in one product per group.
pub fn conv(g: &mut Graph, x: NodeId, weight: NodeId, bias: Option<NodeId>, at: &Geometry, out: &[Dim]) -> NodeId {
    let xd = g.dims(x).to_vec();
    let wd = g.dims(weight).to_vec();
    let n = xd.len() - 2;
    let batch = xd[0].clone();
    let (outs, positions) = (wd[0].clone(), &out[2..]);
    let kernel: Vec<i64> = wd[2..].iter().map(|k| k.as_const().expect("bug: kernel size checked")).collect();
    let one = Dim::constant(1);
    let windows = match tiles(g, x, &kernel, at, positions) {
        Some(tiled) => tiled,
        None => windows(g, x, &kernel, at, positions),
    };

    // Windows meet the kernel: [B P, K C] x [O, K C]^T per group.
    let count = positions.iter().fold(batch.clone(), |acc, p| acc.mul(p));
    let taps = Dim::constant(kernel.iter().product());
    let (channels, group_channels) = (xd[1].clone(), wd[1].clone());
    let kernel_rows = g.reshape(weight, &[outs.clone(), group_channels.clone(), taps.clone()]);
    let kernel_rows = g.permute(kernel_rows, &[0, 2, 1]);
    let y = if at.groups == 1 {
        let cols = g.reshape(windows, &[count.clone(), taps.mul(&channels)]);
        let w = g.reshape(kernel_rows, &[outs.clone(), taps.mul(&channels)]);
        g.matmul_t(cols, w, false, true)
    } else {
        let groups = Dim::constant(at.groups);
        let per_group = outs.div(&groups).expect("bug: groups checked");
        let cols = g.reshape(windows, &[count.clone(), taps.clone(), groups.clone(), group_channels.clone()]);
        let cols = g.permute(cols, &[2, 0, 1, 3]);
        let width = taps.mul(&group_channels);
        let cols = g.reshape(cols, &[groups.clone(), count.clone(), width.clone()]);
        let w = g.reshape(kernel_rows, &[groups.clone(), per_group.clone(), width]);
        let y = g.matmul_t(cols, w, false, true);
        let y = g.permute(y, &[1, 0, 2]);
        g.reshape(y, &[count, outs.clone()])
    };

    // Back to channels first.
    let mut dims = vec![batch];
    dims.extend(positions.iter().cloned());
    dims.push(outs.clone());
    let y = g.reshape(y, &dims);
    let mut perm = vec![0, n + 1];
    perm.extend(1..=n);
    let y = g.permute(y, &perm);
    match bias {
        Some(bias) => {
            let mut dims = vec![outs];
            dims.extend(std::iter::repeat_n(one, n));
            let bias = g.reshape(bias, &dims);
            g.add(y, bias)
        }
        None => y,
    }
}

/// Each output position's window `[B, *P, *K, C]` by one `Gather` from the
/// input laid out channels last, a zero row after each image's pixels.
fn windows(g: &mut Graph, x: NodeId, kernel: &[i64], at: &Geometry, positions: &[Dim]) -> NodeId {
    let xd = g.dims(x).to_vec();
    let n = xd.len() - 2;
    let (batch, channels, sizes) = (xd[0].clone(), xd[1].clone(), &xd[2..]);
    let one = Dim::constant(1);
    let pixels = sizes.iter().fold(one.clone(), |acc, s| acc.mul(s));
    // The table: channels last, a zero row after each image's pixels.
    let mut perm = vec![0];
    perm.extend(2..2 + n);
    perm.push(1);
    let last = g.permute(x, &perm);
    let rows = g.reshape(last, &[batch.clone(), pixels.clone(), channels.clone()]);
    let zeros = g.full(0.0, DType::F32, &[batch.clone(), one.clone(), channels.clone()]);
    let padded = g.concat(&[rows, zeros], 1);
    let stride = pixels.add(&one);
    let table = g.reshape(padded, &[batch.mul(&stride), channels.clone()]);

    // The row ids `[B, *P, *K]`, built from `iota`s along their own axes.
    let rank = 1 + 2 * n;
    let along = |g: &mut Graph, len: Dim, axis: usize| {
        let i = g.iota(len.clone());
        let mut dims = vec![one.clone(); rank];
        dims[axis] = len;
        g.reshape(i, &dims)
    };
    let int = |g: &mut Graph, v: i64| g.constant(v as f64, DType::Int);
    let zero = int(g, 0);
    let (mut flat, mut inside) = (zero, None);
    for a in 0..n {
        let p = along(g, positions[a].clone(), 1 + a);
        let k = along(g, Dim::constant(kernel[a]), 1 + n + a);
        let (s, d, pad) = (int(g, at.stride[a]), int(g, at.dilation[a]), int(g, at.padding[a]));
        let (ps, kd) = (g.mul(p, s), g.mul(k, d));
        let sum = g.add(ps, kd);
        let pos = g.sub(sum, pad);
        let size = g.size(sizes[a].clone());
        let size = g.cast(size, DType::Int);
        let (low, high) = (g.binary(Binary::Ge, pos, zero), g.binary(Binary::Lt, pos, size));
        let ok = g.binary(Binary::And, low, high);
        inside = Some(match inside {
            Some(before) => g.binary(Binary::And, before, ok),
            None => ok,
        });
        let scaled = g.mul(flat, size);
        flat = g.add(scaled, pos);
    }
    let padding_row = g.size(pixels);
    let padding_row = g.cast(padding_row, DType::Int);
    let within = g.select(inside.expect("a convolution has a spatial axis"), flat, padding_row);
    let b = along(g, batch.clone(), 0);
    let image = g.size(stride);
    let image = g.cast(image, DType::Int);
    let first = g.mul(b, image);
    let ids = g.add(within, first);
    g.gather(table, ids)
}

/// The windows when they tile the input (kernel = stride, no padding or
/// dilation, sizes that divide: ViT's patches, 1 x 1 kernels): a reshape
/// and a permute, no gather.
fn tiles(g: &mut Graph, x: NodeId, kernel: &[i64], at: &Geometry, positions: &[Dim]) -> Option<NodeId> {
    let xd = g.dims(x).to_vec();
    let n = kernel.len();
    let tiled = (0..n).all(|a| {
        at.stride[a] == kernel[a]
            && at.padding[a] == 0
            && at.dilation[a] == 1
            && positions[a].mul(&Dim::constant(kernel[a])) == xd[2 + a]
    });
    if !tiled {
        return None;
    }
    let mut split = xd[..2].to_vec();
    for a in 0..n {
        split.extend([positions[a].clone(), Dim::constant(kernel[a])]);
    }
    let split = g.reshape(x, &split);
    let mut perm = vec![0];
    perm.extend((0..n).map(|a| 2 + 2 * a));
    perm.extend((0..n).map(|a| 3 + 2 * a));
    perm.push(1);
    Some(g.permute(split, &perm))
}
