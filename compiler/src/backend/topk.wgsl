// `topk`'s order on the GPU, as `ir/topk.rs` gives it on the CPU: torch.topk's
// (libstdc++'s partial_sort, or nth_element then sort), ties included, on a
// row copied into `tk_q` as (value, index) pairs. TK_N is the row's length.
// Recursion is not allowed in WGSL: introsort's right parts wait on a stack.
// One invocation a workgroup: its memory is the row's (private arrays
// indexed at run time compile to code that grows with their length).

var<workgroup> tk_q: array<vec2<f32>, TK_N>;
var<workgroup> tk_stack: array<vec3<u32>, 64>;

// torch's comparison: a before b when a is NaN and b is not, or larger.
fn tk_before(a: vec2<f32>, b: vec2<f32>) -> bool {
    let a_nan = !(a.x == a.x);
    let b_nan = !(b.x == b.x);
    return (a_nan && !b_nan) || a.x > b.x;
}

fn tk_swap(a: u32, b: u32) {
    let t = tk_q[a];
    tk_q[a] = tk_q[b];
    tk_q[b] = t;
}

fn tk_lg(n: u32) -> u32 {
    return 31u - countLeadingZeros(n);
}

// __adjust_heap on tk_q[base .. base + len], ending in __push_heap.
fn tk_adjust_heap(base: u32, start: u32, len: u32, value: vec2<f32>) {
    var hole = start;
    var child = start;
    let inner = select(0u, (len - 1u) / 2u, len >= 1u);
    while (child < inner) {
        child = 2u * (child + 1u);
        if (tk_before(tk_q[base + child], tk_q[base + child - 1u])) {
            child -= 1u;
        }
        tk_q[base + hole] = tk_q[base + child];
        hole = child;
    }
    if (len % 2u == 0u && len >= 2u && child == (len - 2u) / 2u) {
        child = 2u * (child + 1u);
        tk_q[base + hole] = tk_q[base + child - 1u];
        hole = child - 1u;
    }
    var parent = select(0u, (hole - 1u) / 2u, hole >= 1u);
    while (hole > start && tk_before(tk_q[base + parent], value)) {
        tk_q[base + hole] = tk_q[base + parent];
        hole = parent;
        parent = select(0u, (hole - 1u) / 2u, hole >= 1u);
    }
    tk_q[base + hole] = value;
}

fn tk_pop_heap(base: u32, len: u32, result: u32) {
    let value = tk_q[base + result];
    tk_q[base + result] = tk_q[base];
    tk_adjust_heap(base, 0u, len, value);
}

// __heap_select on tk_q[base .. base + n].
fn tk_heap_select(base: u32, n: u32, middle: u32) {
    if (middle >= 2u) {
        var parent = (middle - 2u) / 2u;
        loop {
            tk_adjust_heap(base, parent, middle, tk_q[base + parent]);
            if (parent == 0u) {
                break;
            }
            parent -= 1u;
        }
    }
    for (var i = middle; i < n; i++) {
        if (tk_before(tk_q[base + i], tk_q[base])) {
            tk_pop_heap(base, middle, i);
        }
    }
}

fn tk_partial_sort(base: u32, n: u32, middle: u32) {
    tk_heap_select(base, n, middle);
    var last = middle;
    while (last > 1u) {
        last -= 1u;
        tk_pop_heap(base, last, last);
    }
}

// __unguarded_linear_insert.
fn tk_linear_insert(base: u32, at: u32) {
    var i = at;
    let value = tk_q[base + i];
    while (tk_before(value, tk_q[base + i - 1u])) {
        tk_q[base + i] = tk_q[base + i - 1u];
        i -= 1u;
    }
    tk_q[base + i] = value;
}

fn tk_insertion_sort(base: u32, n: u32) {
    for (var i = 1u; i < n; i++) {
        if (tk_before(tk_q[base + i], tk_q[base])) {
            let value = tk_q[base + i];
            for (var j = i; j > 0u; j--) {
                tk_q[base + j] = tk_q[base + j - 1u];
            }
            tk_q[base] = value;
        } else {
            tk_linear_insert(base, i);
        }
    }
}

// __unguarded_partition_pivot on tk_q[base .. base + n]: where the second part starts.
fn tk_partition_pivot(base: u32, n: u32) -> u32 {
    let a = base + 1u;
    let b = base + n / 2u;
    let c = base + n - 1u;
    var median = b;
    if (tk_before(tk_q[a], tk_q[b])) {
        if (tk_before(tk_q[b], tk_q[c])) {
            median = b;
        } else if (tk_before(tk_q[a], tk_q[c])) {
            median = c;
        } else {
            median = a;
        }
    } else if (tk_before(tk_q[a], tk_q[c])) {
        median = a;
    } else if (tk_before(tk_q[b], tk_q[c])) {
        median = c;
    } else {
        median = b;
    }
    tk_swap(base, median);
    var first = 1u;
    var last = n;
    loop {
        while (tk_before(tk_q[base + first], tk_q[base])) {
            first += 1u;
        }
        last -= 1u;
        while (tk_before(tk_q[base], tk_q[base + last])) {
            last -= 1u;
        }
        if (first >= last) {
            break;
        }
        tk_swap(base + first, base + last);
        first += 1u;
    }
    return first;
}

// __introselect.
fn tk_nth_element(n: u32, nth: u32) {
    if (n == 0u || nth == n) {
        return;
    }
    var first = 0u;
    var last = n;
    var depth = 2u * tk_lg(n);
    while (last - first > 3u) {
        if (depth == 0u) {
            tk_heap_select(first, last - first, nth + 1u - first);
            tk_swap(first, nth);
            return;
        }
        depth -= 1u;
        let cut = first + tk_partition_pivot(first, last - first);
        if (cut <= nth) {
            first = cut;
        } else {
            last = cut;
        }
    }
    tk_insertion_sort(first, last - first);
}

// std::sort: __introsort_loop (the parts are disjoint, so the order the
// stack visits them in changes nothing), then __final_insertion_sort.
fn tk_sort(n: u32) {
    if (n == 0u) {
        return;
    }
    tk_stack[0] = vec3<u32>(0u, n, 2u * tk_lg(n));
    var top = 1u;
    while (top > 0u) {
        top -= 1u;
        let part = tk_stack[top];
        let first = part.x;
        var last = part.y;
        var depth = part.z;
        while (last - first > 16u) {
            if (depth == 0u) {
                tk_partial_sort(first, last - first, last - first);
                break;
            }
            depth -= 1u;
            let cut = first + tk_partition_pivot(first, last - first);
            // Parts of 16 or fewer wait for the insertion sort: those
            // waiting are disjoint and longer, at most 1023 / 17 of them.
            if (last - cut > 16u) {
                tk_stack[top] = vec3<u32>(cut, last, depth);
                top += 1u;
            }
            last = cut;
        }
    }
    if (n > 16u) {
        tk_insertion_sort(0u, 16u);
        for (var i = 16u; i < n; i++) {
            tk_linear_insert(0u, i);
        }
    } else {
        tk_insertion_sort(0u, n);
    }
}

// The k first entries of tk_q[0 .. n] in torch.topk's order.
fn tk_order(n: u32, k: u32) {
    if (k * 64u <= n) {
        tk_partial_sort(0u, n, k);
    } else {
        tk_nth_element(n, k - 1u);
        tk_sort(k - 1u);
    }
}
