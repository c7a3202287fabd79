//! The order `topk` takes a row's entries in: `torch.topk`'s on the CPU
//! (largest first, sorted), ties included, so that a router whose experts
//! tie chooses the experts transformers' Mixtral chooses.
//!
//! PyTorch keeps (value, index) pairs in index order and, comparing values
//! only (NaN above everything), either partially sorts the first k
//! (`std::partial_sort`, when `64 k <= n`) or places the k-th largest with
//! `std::nth_element` and sorts the k - 1 before it (`std::sort`). Which of
//! several equal values comes first is what those libstdc++ algorithms
//! leave there (with 8 equal entries and k = 2, indices 6 and 5, not 0 and
//! 1), so they are written here step for step (introselect, introsort, the
//! heap functions), as `bits/stl_algo.h` and `bits/stl_heap.h` have them.

/// The indices of the `k` largest entries of `row`, in `torch.topk`'s order.
pub fn order<T: PartialOrd + Copy>(row: &[T], k: usize) -> Vec<usize> {
    let n = row.len();
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    let mut queue: Vec<(T, usize)> = row.iter().copied().zip(0..).collect();
    let q = &mut queue[..];
    if k * 64 <= n {
        partial_sort(q, k);
    } else {
        nth_element(q, k - 1);
        sort(&mut q[..k - 1]);
    }
    queue[..k].iter().map(|(_, i)| *i).collect()
}

/// torch's comparison: `a` before `b` when it is NaN and `b` is not, or larger.
fn before<T: PartialOrd>(a: &(T, usize), b: &(T, usize)) -> bool {
    let nan = |x: &T| x.partial_cmp(x).is_none();
    (nan(&a.0) && !nan(&b.0)) || a.0 > b.0
}

/// floor(log2(n)), `std::__lg`.
fn lg(n: usize) -> usize {
    (usize::BITS - 1 - n.leading_zeros()) as usize
}

/// `std::nth_element`: `__introselect`.
fn nth_element<T: PartialOrd + Copy>(q: &mut [T2<T>], nth: usize) {
    if q.is_empty() || nth == q.len() {
        return;
    }
    let (mut first, mut last) = (0, q.len());
    let mut depth = 2 * lg(q.len());
    while last - first > 3 {
        if depth == 0 {
            heap_select(&mut q[first..last], nth + 1 - first);
            q.swap(first, nth);
            return;
        }
        depth -= 1;
        let cut = first + partition_pivot(&mut q[first..last]);
        if cut <= nth {
            first = cut;
        } else {
            last = cut;
        }
    }
    insertion_sort(&mut q[first..last]);
}

type T2<T> = (T, usize);

/// `std::sort`: `__introsort_loop`, then `__final_insertion_sort`.
fn sort<T: PartialOrd + Copy>(q: &mut [T2<T>]) {
    if q.is_empty() {
        return;
    }
    introsort_loop(q, 2 * lg(q.len()));
    if q.len() > 16 {
        insertion_sort(&mut q[..16]);
        for i in 16..q.len() {
            linear_insert(q, i);
        }
    } else {
        insertion_sort(q);
    }
}

fn introsort_loop<T: PartialOrd + Copy>(q: &mut [T2<T>], mut depth: usize) {
    let mut last = q.len();
    while last > 16 {
        if depth == 0 {
            partial_sort(&mut q[..last], last);
            return;
        }
        depth -= 1;
        let cut = partition_pivot(&mut q[..last]);
        introsort_loop(&mut q[cut..last], depth);
        last = cut;
    }
}

/// `__unguarded_partition_pivot`: the median of the second, middle and
/// last entries moved first, then a partition around it; where the second part starts.
fn partition_pivot<T: PartialOrd + Copy>(q: &mut [T2<T>]) -> usize {
    let (a, b, c) = (1, q.len() / 2, q.len() - 1);
    let median = if before(&q[a], &q[b]) {
        if before(&q[b], &q[c]) {
            b
        } else if before(&q[a], &q[c]) {
            c
        } else {
            a
        }
    } else if before(&q[a], &q[c]) {
        a
    } else if before(&q[b], &q[c]) {
        c
    } else {
        b
    };
    q.swap(0, median);
    // `__unguarded_partition(first + 1, last, first)`.
    let (mut first, mut last) = (1, q.len());
    loop {
        while before(&q[first], &q[0]) {
            first += 1;
        }
        last -= 1;
        while before(&q[0], &q[last]) {
            last -= 1;
        }
        if first >= last {
            return first;
        }
        q.swap(first, last);
        first += 1;
    }
}

/// `__insertion_sort`.
fn insertion_sort<T: PartialOrd + Copy>(q: &mut [T2<T>]) {
    for i in 1..q.len() {
        if before(&q[i], &q[0]) {
            q[..=i].rotate_right(1);
        } else {
            linear_insert(q, i);
        }
    }
}

/// `__unguarded_linear_insert`: entry `i` moved down past the entries it goes before.
fn linear_insert<T: PartialOrd + Copy>(q: &mut [T2<T>], mut i: usize) {
    let value = q[i];
    while before(&value, &q[i - 1]) {
        q[i] = q[i - 1];
        i -= 1;
    }
    q[i] = value;
}

/// `std::partial_sort(first, first + middle, last)`.
fn partial_sort<T: PartialOrd + Copy>(q: &mut [T2<T>], middle: usize) {
    heap_select(q, middle);
    // `__sort_heap`.
    let mut last = middle;
    while last > 1 {
        last -= 1;
        pop_heap(q, last, last);
    }
}

/// `__heap_select`: the first `middle` entries made a heap of the ones that go first.
fn heap_select<T: PartialOrd + Copy>(q: &mut [T2<T>], middle: usize) {
    // `__make_heap`.
    if middle >= 2 {
        let mut parent = (middle - 2) / 2;
        loop {
            let value = q[parent];
            adjust_heap(q, parent, middle, value);
            if parent == 0 {
                break;
            }
            parent -= 1;
        }
    }
    for i in middle..q.len() {
        if before(&q[i], &q[0]) {
            pop_heap(q, middle, i);
        }
    }
}

/// `__pop_heap(first, first + len, first + result)`.
fn pop_heap<T: PartialOrd + Copy>(q: &mut [T2<T>], len: usize, result: usize) {
    let value = q[result];
    q[result] = q[0];
    adjust_heap(q, 0, len, value);
}

/// `__adjust_heap`, ending in `__push_heap`.
fn adjust_heap<T: PartialOrd + Copy>(q: &mut [T2<T>], mut hole: usize, len: usize, value: T2<T>) {
    let top = hole;
    let mut child = hole;
    while child < len.saturating_sub(1) / 2 {
        child = 2 * (child + 1);
        if before(&q[child], &q[child - 1]) {
            child -= 1;
        }
        q[hole] = q[child];
        hole = child;
    }
    if len.is_multiple_of(2) && len >= 2 && child == (len - 2) / 2 {
        child = 2 * (child + 1);
        q[hole] = q[child - 1];
        hole = child - 1;
    }
    let mut parent = hole.saturating_sub(1) / 2;
    while hole > top && before(&q[parent], &value) {
        q[hole] = q[parent];
        hole = parent;
        parent = hole.saturating_sub(1) / 2;
    }
    q[hole] = value;
}

#[cfg(test)]
mod tests {
    use super::order;

    #[test]
    fn ties_go_where_libstdcxx_leaves_them() {
        // torch.topk(torch.zeros(8), 2).indices == [6, 5].
        assert_eq!(order(&[0.0f32; 8], 2), [6, 5]);
        // Distinct values: plain descending order.
        assert_eq!(order(&[0.1f64, 0.9, 0.3, 0.7], 3), [1, 3, 2]);
        // NaN counts as the largest.
        assert_eq!(order(&[1.0f32, f32::NAN, 2.0], 2), [1, 2]);
    }
}
