//! The training program: forward, loss, backward and the optimiser update
//! in one graph. Frozen parameters get neither gradients nor updates.
//!
//! Inputs besides the model's: `lr` (this step's learning rate, so the
//! schedule lives outside), `step` (1-based; seeds dropout and bias
//! correction) and the optimiser state `m:NAME`, `v:NAME` (AdamW) or
//! `momentum:NAME` (SGD). Outputs: `loss`, `grad_norm`, `new:NAME` and the
//! new optimiser state under the input names.

use super::grad::grad;
use super::graph::*;
use super::signature::Role;
use crate::types::DType;
use crate::types::TensorTy;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    /// Adam with decoupled weight decay (Loshchilov & Hutter 2019).
    AdamW { beta1: f64, beta2: f64, eps: f64, weight_decay: f64 },
    /// SGD with momentum; weight decay added to the gradient.
    Sgd { momentum: f64, weight_decay: f64 },
}

impl Default for Optimizer {
    fn default() -> Optimizer {
        Optimizer::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TrainConfig {
    pub optimizer: Optimizer,
    /// Clip the global gradient norm to this value.
    pub clip: Option<f64>,
}

/// Names of the optimiser state tensors of one parameter.
pub fn state_names(opt: &Optimizer, param: &str) -> Vec<String> {
    match opt {
        Optimizer::AdamW { .. } => vec![Role::FirstMoment(param).name(), Role::SecondMoment(param).name()],
        Optimizer::Sgd { .. } => vec![Role::Momentum(param).name()],
    }
}

/// Extends a lowered training graph (with a `loss` output) into the training
/// program updating `trainable` parameters: its outputs are the loss, the
/// gradients' norm and the new parameters and optimiser state (the model's
/// own outputs are dropped). Returns `None` without a loss.
pub fn training_program(forward: &Graph, trainable: &[String], cfg: &TrainConfig) -> Option<Graph> {
    let mut g = forward.clone();
    let (params, grads) = gradients(&mut g, trainable)?;
    let loss = g.output("loss");
    update(&mut g, &params, grads, loss, cfg);
    super::verify::after("the training program", &g);
    Some(g)
}

/// The forward graph with the gradients of the loss as outputs `grad:NAME`
/// (for gradient accumulation, and to inspect them).
pub fn gradient_program(forward: &Graph, trainable: &[String]) -> Option<Graph> {
    let mut g = forward.clone();
    let (params, grads) = gradients(&mut g, trainable)?;
    for ((name, _), gr) in params.iter().zip(grads) {
        g.outputs.push((Role::Gradient(name).name(), gr));
    }
    super::verify::after("the gradient program", &g);
    Some(g)
}

/// The optimiser step alone: parameters and their (accumulated) gradients
/// `grad:NAME` in, the same outputs as the training program but `loss`.
pub fn update_program(params: &[(String, TensorTy)], cfg: &TrainConfig) -> Graph {
    let mut g = Graph::default();
    let ids: Vec<(String, NodeId)> = params.iter().map(|(n, ty)| (n.clone(), g.param(n, ty.clone()))).collect();
    let grads = params.iter().map(|(n, ty)| g.input(&Role::Gradient(n).name(), ty.clone())).collect();
    update(&mut g, &ids, grads, None, cfg);
    super::verify::after("the update program", &g);
    g
}

type Grads = (Vec<(String, NodeId)>, Vec<NodeId>);

fn gradients(g: &mut Graph, trainable: &[String]) -> Option<Grads> {
    let loss = g.output("loss")?;
    // The step's outputs are the loss and what follows; the model's other
    // outputs (its logits: 262 MB a step for stories15M) would otherwise stay
    // alive to the end of the step and be copied out of it.
    g.outputs.retain(|(name, _)| name == "loss" || matches!(Role::of(name), Role::Metric(_)));
    let params: Vec<(String, NodeId)> =
        g.params().filter(|(n, _)| trainable.iter().any(|t| t == n)).map(|(n, id)| (n.to_string(), id)).collect();
    let ids: Vec<NodeId> = params.iter().map(|(_, id)| *id).collect();
    let grads = grad(g, loss, &ids);
    Some((params, grads))
}

/// Global-norm clipping and the optimiser's update of each parameter. A
/// step whose gradients' norm (or `loss`) is not finite leaves every weight
/// and every optimiser state as it was: the CPU writes the new values over
/// the old ones, so that is how the caller keeps the state before a
/// diverging step. (The gate makes every update wait for the norm, so all
/// gradients are live at once, as with clipping.)
fn update(g: &mut Graph, params: &[(String, NodeId)], mut grads: Vec<NodeId>, loss: Option<NodeId>, cfg: &TrainConfig) {
    // Global norm, and clipping by it.
    let mut total = g.constant(0.0, DType::F32);
    for gr in &grads {
        let sq = g.mul(*gr, *gr);
        let s = g.sum_all(sq);
        total = g.add(total, s);
    }
    let norm = g.unary(Unary::Sqrt, total);
    // The clipping factor. AdamW folds it into its moments' coefficients
    // (scalars): a clipped gradient, which both moments read, would be a
    // stored copy of every gradient, all live at once at the update.
    let factor = cfg.clip.map(|clip| {
        let eps = g.constant(1e-6, DType::F32);
        let denom = g.add(norm, eps);
        let c = g.constant(clip, DType::F32);
        let ratio = g.div(c, denom);
        let one = g.constant(1.0, DType::F32);
        g.binary(Binary::Min, ratio, one)
    });
    if let (Some(factor), Optimizer::Sgd { .. }) = (factor, &cfg.optimizer) {
        for gr in &mut grads {
            *gr = g.mul(*gr, factor);
        }
    }
    g.outputs.push(("grad_norm".into(), norm));
    let finite = |g: &mut Graph, x: NodeId| {
        let magnitude = g.unary(Unary::Abs, x);
        let max = g.constant(f32::MAX as f64, DType::F32);
        g.binary(Binary::Le, magnitude, max)
    };
    let mut ok = finite(g, norm);
    if let Some(loss) = loss {
        let loss_ok = finite(g, loss);
        ok = g.binary(Binary::And, ok, loss_ok);
    }
    // The gated value is the output, and what the weight's update reads: a
    // moment's kernel then makes it alone (one store, over the old moment).
    let keep = |g: &mut Graph, name: String, new: NodeId, old: NodeId| {
        let kept = g.select(ok, new, old);
        g.outputs.push((name, kept));
        kept
    };

    let lr = g.input("lr", TensorTy::scalar(DType::F32));
    let step = g.input("step", TensorTy::scalar(DType::F32));
    for ((name, p), gr) in params.iter().zip(grads) {
        let ty = g.ty(*p).clone();
        match cfg.optimizer {
            Optimizer::AdamW { beta1, beta2, eps, weight_decay } => {
                let m = g.input(&Role::FirstMoment(name).name(), ty.clone());
                let v = g.input(&Role::SecondMoment(name).name(), ty.clone());
                // The clipped gradient's contributions: (1 - beta1) factor g
                // and g ((1 - beta2) factor^2 g). (Not (g g) c: the norm's
                // g g, merged with it, would be stored for the update.)
                let (gm, gv) = match factor {
                    Some(f) => {
                        let c1 = g.scale(f, 1.0 - beta1);
                        let f2 = g.mul(f, f);
                        let c2 = g.scale(f2, 1.0 - beta2);
                        let gc2 = g.mul(gr, c2);
                        (g.mul(gr, c1), g.mul(gr, gc2))
                    }
                    None => {
                        let gc2 = g.scale(gr, 1.0 - beta2);
                        (g.scale(gr, 1.0 - beta1), g.mul(gr, gc2))
                    }
                };
                let m1 = g.scale(m, beta1);
                let m_new = g.add(m1, gm);
                let m_new = keep(g, Role::FirstMoment(name).name(), m_new, m);
                let v1 = g.scale(v, beta2);
                let v_new = g.add(v1, gv);
                let v_new = keep(g, Role::SecondMoment(name).name(), v_new, v);
                // Bias corrections 1 - beta^step.
                let b1 = g.constant(beta1, DType::F32);
                let b1t = g.binary(Binary::Pow, b1, step);
                let one = g.constant(1.0, DType::F32);
                let c1 = g.sub(one, b1t);
                let b2 = g.constant(beta2, DType::F32);
                let b2t = g.binary(Binary::Pow, b2, step);
                let c2 = g.sub(one, b2t);
                // Corrections as scalar reciprocals: one division an element
                // where there were three (an update took ~1.2x as long, bound
                // by its divisions, not its bytes).
                let inv_c1 = g.div(one, c1);
                let m_hat = g.mul(m_new, inv_c1);
                let root_c2 = g.unary(Unary::Sqrt, c2);
                let inv_root_c2 = g.div(one, root_c2);
                let root = g.unary(Unary::Sqrt, v_new);
                let root = g.mul(root, inv_root_c2);
                let e = g.constant(eps, DType::F32);
                let denom = g.add(root, e);
                let mut update = g.div(m_hat, denom);
                if weight_decay != 0.0 {
                    let wd = g.scale(*p, weight_decay);
                    update = g.add(update, wd);
                }
                let delta = g.mul(update, lr);
                let p_new = g.sub(*p, delta);
                keep(g, Role::Updated(name).name(), p_new, *p);
            }
            Optimizer::Sgd { momentum, weight_decay } => {
                let mut d = gr;
                if weight_decay != 0.0 {
                    let wd = g.scale(*p, weight_decay);
                    d = g.add(d, wd);
                }
                let buf = g.input(&Role::Momentum(name).name(), ty.clone());
                let b = g.scale(buf, momentum);
                let buf_new = g.add(b, d);
                let buf_new = keep(g, Role::Momentum(name).name(), buf_new, buf);
                let delta = g.mul(buf_new, lr);
                let p_new = g.sub(*p, delta);
                keep(g, Role::Updated(name).name(), p_new, *p);
            }
        }
    }
}
