//! DPO's objective as TRL 1.16's DPOTrainer computes it, from per-sequence log-probabilities:
//! every loss type (alone or weighted together), the f-divergences, WPO weighting, and the
//! rewards and log-prob metrics it logs. The log-probs come from one forward over the chosen and
//! rejected sequences (the policy) and one with the adapters switched off, or precomputed (the
//! reference); this module only turns them into the loss.

use config::types::{DpoLoss, FDivergence};
use tch::{Kind, Tensor};

use crate::Error;

/// The DPO settings of a recipe that shape the loss.
#[derive(Debug, Clone, PartialEq)]
pub struct DpoObjective {
    /// `beta`: the strength of the implicit KL penalty (IPO's tau).
    pub beta: f64,
    /// `label_smoothing`: used by `robust`, `exo_pair`, `aot` and `aot_unpaired`.
    pub label_smoothing: f64,
    /// `discopop_tau`.
    pub discopop_tau: f64,
    /// `f_divergence_type`.
    pub f_divergence: FDivergence,
    /// `f_alpha_divergence_coef`.
    pub alpha_coef: f64,
    /// `loss_type` with `loss_weights` (1 each when not given).
    pub losses: Vec<(DpoLoss, f64)>,
    /// `use_weighting` (WPO): each pair's loss times the two sequences' weights.
    pub use_weighting: bool,
    /// `ld_alpha` (LD-DPO): each completion's log-probs past the pair's shorter completion count
    /// with this weight (`None`: all count fully).
    pub ld_alpha: Option<f64>,
}

impl Default for DpoObjective {
    /// DPOConfig's defaults: the sigmoid loss, beta 0.1.
    fn default() -> Self {
        DpoObjective {
            beta: 0.1,
            label_smoothing: 0.0,
            discopop_tau: 0.05,
            f_divergence: FDivergence::ReverseKl,
            alpha_coef: 0.5,
            losses: vec![(DpoLoss::Sigmoid, 1.0)],
            use_weighting: false,
            ld_alpha: None,
        }
    }
}

/// What one micro-batch of B pairs gives the loss, each a `[B]` f32 tensor unless said.
pub struct PairLogps {
    /// The policy's summed completion log-probs of the chosen sequences (with gradient).
    pub chosen: Tensor,
    /// The same for the rejected sequences.
    pub rejected: Tensor,
    /// The reference's (no gradient).
    pub ref_chosen: Tensor,
    /// The reference's for the rejected sequences.
    pub ref_rejected: Tensor,
    /// Completion tokens of each chosen sequence (at least 1), for the length-averaged losses.
    pub chosen_tokens: Tensor,
    /// Completion tokens of each rejected sequence (at least 1).
    pub rejected_tokens: Tensor,
    /// The `sft` term: the mean negative log-prob over all chosen completion tokens of the
    /// micro-batch (a scalar, with gradient); needed only when `sft` is among the losses.
    pub chosen_nll: Option<Tensor>,
    /// WPO's detached per-sequence weights, `[2B]` (chosen then rejected); needed only with
    /// `use_weighting`.
    pub weights: Option<Tensor>,
}

/// The numbers DPOTrainer logs for a micro-batch (means over its pairs), under TRL's names.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DpoMetrics {
    /// `rewards/chosen`: `beta * (chosen - ref_chosen)`.
    pub rewards_chosen: f64,
    /// `rewards/rejected`.
    pub rewards_rejected: f64,
    /// `rewards/accuracies`: the share of pairs whose chosen reward is strictly larger.
    pub rewards_accuracies: f64,
    /// `rewards/margins`.
    pub rewards_margins: f64,
    /// `logps/chosen`: the policy's summed log-probs.
    pub logps_chosen: f64,
    /// `logps/rejected`.
    pub logps_rejected: f64,
    /// `logits/chosen`: the mean over the chosen completions' scored positions of the mean logit
    /// over the vocabulary.
    pub logits_chosen: f64,
    /// `logits/rejected`.
    pub logits_rejected: f64,
    /// `entropy`: the mean next-token entropy over every scored position.
    pub entropy: f64,
    /// `mean_token_accuracy`: the share of the chosen completions' tokens that are the top-1
    /// prediction.
    pub mean_token_accuracy: f64,
}

fn logsig(x: &Tensor) -> Result<Tensor, tch::TchError> {
    x.f_log_sigmoid()
}

impl DpoMetrics {
    /// The values in [`DPO_METRICS`]' order.
    pub fn values(&self) -> [f64; 10] {
        [
            self.rewards_chosen,
            self.rewards_rejected,
            self.rewards_accuracies,
            self.rewards_margins,
            self.logps_chosen,
            self.logps_rejected,
            self.logits_chosen,
            self.logits_rejected,
            self.entropy,
            self.mean_token_accuracy,
        ]
    }
}

impl DpoObjective {
    /// Checks TRL makes when the trainer starts, so a recipe fails before any work.
    pub fn check(&self) -> Result<(), String> {
        let has = |l: DpoLoss| self.losses.iter().any(|(x, _)| *x == l);
        if self.losses.is_empty() {
            return Err("loss_type: at least one loss".into());
        }
        if has(DpoLoss::ExoPair) && self.label_smoothing == 0.0 {
            return Err("loss_type exo_pair needs label_smoothing > 0".into());
        }
        if self.use_weighting && (has(DpoLoss::Aot) || has(DpoLoss::AotUnpaired)) {
            return Err("use_weighting is not implemented for aot and aot_unpaired".into());
        }
        if self.ld_alpha.is_some() && has(DpoLoss::Sft) {
            // TRL's sft term averages the unweighted log-probs; nibble's sums carry LD's weights.
            return Err("ld_alpha cannot be combined with the sft loss (RPO) yet".into());
        }
        if self.use_weighting && has(DpoLoss::Sft) {
            // TRL multiplies an expanded view in place and fails on any batch of two or more.
            return Err("use_weighting cannot be combined with the sft loss".into());
        }
        let plain = |l: &DpoLoss| {
            matches!(
                l,
                DpoLoss::Sigmoid
                    | DpoLoss::SigmoidNorm
                    | DpoLoss::Hinge
                    | DpoLoss::Ipo
                    | DpoLoss::ExoPair
                    | DpoLoss::Robust
                    | DpoLoss::Discopop
                    | DpoLoss::Sft
            )
        };
        if self.f_divergence != FDivergence::ReverseKl
            && let Some((l, _)) = self.losses.iter().find(|(l, _)| !plain(l))
        {
            return Err(format!("f_divergence_type {} cannot be used with loss_type {l}", self.f_divergence));
        }
        Ok(())
    }

    /// The f-divergence's score of a log-ratio.
    fn score(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        Ok(match self.f_divergence {
            FDivergence::ReverseKl => x.shallow_clone(),
            FDivergence::ForwardKl => x.f_neg()?.f_exp()?.f_neg()?.f_add_scalar(1.0)?,
            FDivergence::JsDivergence => logsig(x)?.f_add_scalar(std::f64::consts::LN_2)?,
            FDivergence::AlphaDivergence => {
                let a = self.alpha_coef;
                if (a - 1.0).abs() < 1e-6 {
                    x.shallow_clone()
                } else {
                    let cap = if x.kind() == Kind::Half { 11.0 } else { 80.0 };
                    let e = x.f_to_kind(Kind::Float)?.f_mul_scalar(a - 1.0)?.f_clamp_max(cap)?.f_exp()?;
                    e.f_sub_scalar(1.0)?.f_to_kind(x.kind())?.f_div_scalar(a - 1.0)?
                }
            }
        })
    }

    /// The per-pair loss `[B]` of one loss type.
    fn per_pair(&self, loss: DpoLoss, p: &PairLogps) -> Result<Tensor, tch::TchError> {
        let (beta, eps) = (self.beta, self.label_smoothing);
        let cl = p.chosen.f_sub(&p.ref_chosen)?;
        let rl = p.rejected.f_sub(&p.ref_rejected)?;
        let (sc, sr) = (self.score(&cl)?, self.score(&rl)?);
        let z = sc.f_sub(&sr)?.f_mul_scalar(beta)?;
        let smoothed = |d: &Tensor| -> Result<Tensor, tch::TchError> {
            let d = d.f_mul_scalar(beta)?;
            logsig(&d)?.f_mul_scalar(-(1.0 - eps))?.f_sub(&logsig(&d.f_neg()?)?.f_mul_scalar(eps)?)
        };
        let sorted = |t: &Tensor| -> Result<Tensor, tch::TchError> { Ok(t.f_sort(0, false)?.0) };
        Ok(match loss {
            DpoLoss::Sigmoid => logsig(&z)?.f_neg()?,
            DpoLoss::Hinge => z.f_neg()?.f_add_scalar(1.0)?.f_relu()?,
            DpoLoss::Ipo => {
                let d = sc.f_div(&p.chosen_tokens)?.f_sub(&sr.f_div(&p.rejected_tokens)?)?;
                d.f_sub_scalar(1.0 / (2.0 * beta))?.f_square()?
            }
            DpoLoss::SigmoidNorm => {
                let d = sc.f_div(&p.chosen_tokens)?.f_sub(&sr.f_div(&p.rejected_tokens)?)?;
                logsig(&d.f_mul_scalar(beta)?)?.f_neg()?
            }
            DpoLoss::ExoPair => {
                let pos = z.f_sigmoid()?.f_mul(&logsig(&z)?.f_sub_scalar((-eps).ln_1p())?)?;
                let neg = z.f_neg()?.f_sigmoid()?.f_mul(&logsig(&z.f_neg()?)?.f_sub_scalar(eps.ln())?)?;
                pos.f_add(&neg)?
            }
            DpoLoss::NcaPair => {
                let bc = cl.f_mul_scalar(beta)?;
                let br = rl.f_mul_scalar(beta)?;
                logsig(&bc)?
                    .f_neg()?
                    .f_sub(&logsig(&bc.f_neg()?)?.f_mul_scalar(0.5)?)?
                    .f_sub(&logsig(&br.f_neg()?)?.f_mul_scalar(0.5)?)?
            }
            DpoLoss::Robust => logsig(&z)?
                .f_mul_scalar(-(1.0 - eps))?
                .f_add(&logsig(&z.f_neg()?)?.f_mul_scalar(eps)?)?
                .f_div_scalar(1.0 - 2.0 * eps)?,
            DpoLoss::BcoPair => {
                logsig(&cl.f_mul_scalar(beta)?)?.f_neg()?.f_sub(&logsig(&rl.f_mul_scalar(-beta)?)?)?
            }
            DpoLoss::SppoHard => {
                let h = 0.5 / beta;
                cl.f_sub_scalar(h)?.f_square()?.f_add(&rl.f_add_scalar(h)?.f_square()?)?
            }
            DpoLoss::Aot => {
                let policy = sorted(&p.chosen.f_sub(&p.rejected)?)?;
                let reference = sorted(&p.ref_chosen.f_sub(&p.ref_rejected)?)?;
                smoothed(&policy.f_sub(&reference)?)?
            }
            DpoLoss::AotUnpaired => smoothed(&sorted(&cl)?.f_sub(&sorted(&rl)?)?)?,
            DpoLoss::ApoZero => {
                let c = cl.f_mul_scalar(beta)?.f_sigmoid()?;
                c.f_neg()?.f_add_scalar(1.0)?.f_add(&rl.f_mul_scalar(beta)?.f_sigmoid()?)?
            }
            DpoLoss::ApoDown => {
                let c = cl.f_mul_scalar(beta)?.f_sigmoid()?;
                let m = cl.f_sub(&rl)?.f_mul_scalar(beta)?.f_sigmoid()?;
                c.f_add(&m.f_neg()?.f_add_scalar(1.0)?)?
            }
            DpoLoss::Discopop => {
                let m = z.f_div_scalar(self.discopop_tau)?.f_sigmoid()?;
                let a = logsig(&z)?.f_neg()?.f_mul(&m.f_neg()?.f_add_scalar(1.0)?)?;
                a.f_add(&z.f_neg()?.f_exp()?.f_mul(&m)?)?
            }
            DpoLoss::Sft => {
                let nll = p.chosen_nll.as_ref().ok_or_else(|| {
                    tch::TchError::Kind("the sft loss needs the chosen tokens' log-probs".into())
                })?;
                nll.f_expand(p.chosen.size(), false)?
            }
        })
    }

    /// The loss of a micro-batch, `Σ weight · mean over pairs`, and its metrics.
    pub fn loss(&self, p: &PairLogps) -> Result<(Tensor, DpoMetrics), Error> {
        let torch = |e: tch::TchError| Error::Loss(quant::ops::torch_message(&e));
        let b = p.chosen.size().first().copied().unwrap_or(0);
        let mut total: Option<Tensor> = None;
        for (loss, weight) in &self.losses {
            let mut l = self.per_pair(*loss, p).map_err(torch)?;
            if self.use_weighting {
                let w = p
                    .weights
                    .as_ref()
                    .ok_or_else(|| Error::Loss("use_weighting needs the sequences' weights".into()))?;
                let pair = w.f_narrow(0, 0, b).and_then(|c| c.f_mul(&w.f_narrow(0, b, b)?)).map_err(torch)?;
                l = l.f_mul(&pair).map_err(torch)?;
            }
            let term = l.f_mean(Kind::Float).and_then(|m| m.f_mul_scalar(*weight)).map_err(torch)?;
            total = Some(match total {
                None => term,
                Some(t) => t.f_add(&term).map_err(torch)?,
            });
        }
        let total = total.ok_or_else(|| Error::Loss("no DPO loss given".into()))?;
        let metrics = tch::no_grad(|| self.metrics(p)).map_err(torch)?;
        Ok((total, metrics))
    }

    fn metrics(&self, p: &PairLogps) -> Result<DpoMetrics, tch::TchError> {
        let mean = |t: &Tensor| -> Result<f64, tch::TchError> {
            t.f_to_kind(Kind::Double)?.f_mean(Kind::Double)?.f_double_value(&[])
        };
        let chosen = p.chosen.f_detach()?.f_sub(&p.ref_chosen)?.f_mul_scalar(self.beta)?;
        let rejected = p.rejected.f_detach()?.f_sub(&p.ref_rejected)?.f_mul_scalar(self.beta)?;
        Ok(DpoMetrics {
            rewards_chosen: mean(&chosen)?,
            rewards_rejected: mean(&rejected)?,
            rewards_accuracies: mean(&chosen.f_gt_tensor(&rejected)?)?,
            rewards_margins: mean(&chosen.f_sub(&rejected)?)?,
            logps_chosen: mean(&p.chosen.f_detach()?)?,
            logps_rejected: mean(&p.rejected.f_detach()?)?,
            ..DpoMetrics::default()
        })
    }
}

/// Each sequence's completion log-probs from one forward over `rows` sequences (a DPO batch:
/// the B chosen sequences, then the B rejected ones).
#[derive(Debug)]
pub struct SequenceLogps {
    /// `[rows]` summed next-token log-probs over each sequence's completion tokens (f32).
    pub sums: Tensor,
    /// `[rows]` completion tokens of each sequence (f32, at least 1, as TRL counts them).
    pub tokens: Tensor,
    /// `[rows]` WPO's sequence weight: `exp(mean over completion tokens of (log p - log Σ p²))`,
    /// when [`Scoring::weights`] asked for it.
    pub weights: Option<Tensor>,
    /// Per-token statistics for TRL's logged metrics (the policy's pass only).
    pub stats: Option<TokenStats>,
}

/// Per-row sums over the scored positions, for `logits/*`, `entropy` and `mean_token_accuracy`.
#[derive(Debug)]
pub struct TokenStats {
    /// `[rows]` summed next-token entropies.
    pub entropy: Tensor,
    /// `[rows]` summed mean-over-vocabulary logits.
    pub mean_logits: Tensor,
    /// `[rows]` positions whose top-1 prediction is the next token.
    pub top1: Tensor,
    /// `[rows]` scored positions.
    pub scored: Tensor,
}

impl TokenStats {
    /// The micro-batch's metrics as DPOTrainer computes them (B pairs: rows `0..B` chosen).
    fn metrics(&self, b: i64) -> Result<[f64; 4], tch::TchError> {
        let sum = |x: &Tensor, start: i64, len: i64| -> Result<f64, tch::TchError> {
            x.f_narrow(0, start, len)?.f_sum(Kind::Double)?.f_double_value(&[])
        };
        let ratio = |n: f64, d: f64| if d > 0.0 { n / d } else { 0.0 };
        let (nc, nr) = (sum(&self.scored, 0, b)?, sum(&self.scored, b, b)?);
        Ok([
            ratio(sum(&self.mean_logits, 0, b)?, nc),
            ratio(sum(&self.mean_logits, b, b)?, nr),
            ratio(sum(&self.entropy, 0, 2 * b)?, nc + nr),
            ratio(sum(&self.top1, 0, b)?, nc),
        ])
    }
}

/// Which flattened positions of a `[R, T]` batch score a token: position `t` of a row predicts
/// token `t + 1` where that token is a completion token (the last position predicts nothing).
struct Scored {
    /// `[R * T]` the token each position predicts (0 at each row's last position).
    target: Tensor,
    /// `[R * T]` 1 where the predicted token is scored.
    scored: Tensor,
    /// The scored positions, in order.
    positions: Tensor,
    /// LD-DPO's split: whether each scored position is in its pair's shared part (which counts
    /// fully; the longer completion's tail counts `alpha` times), and `alpha`.
    shared: Option<(Tensor, f64)>,
    /// Tokens per row.
    t: i64,
}

impl Scored {
    fn new(
        input_ids: &Tensor,
        completion_mask: &Tensor,
        t: i64,
        dev: tch::Device,
        ld_alpha: Option<f64>,
    ) -> Result<Scored, tch::TchError> {
        let next = |x: &Tensor| -> Result<Tensor, tch::TchError> {
            let x = x.f_to_device(dev)?.f_to_kind(Kind::Int64)?;
            Tensor::f_cat(&[x.f_narrow(1, 1, t - 1)?, x.f_narrow(1, 0, 1)?.f_zeros_like()?], 1)?
                .f_reshape([-1])
        };
        let (target, scored) = (next(input_ids)?, next(completion_mask)?);
        let positions = scored.f_ne(0)?.f_nonzero()?.f_reshape([-1])?;
        let shared = match ld_alpha {
            None => None,
            Some(alpha) => {
                // A position's rank among its row's scored positions, against the number its pair's
                // shorter completion has (rows 0..B chosen, B..2B rejected): TRL's shared part
                // counts fully, the longer one's tail `alpha` times.
                let r = scored.size()[0] / t.max(1);
                let counts = scored.f_reshape([r, t])?.f_sum_dim_intlist(&[1i64][..], false, Kind::Int64)?;
                let b = r / 2;
                let shared = counts.f_narrow(0, 0, b)?.f_minimum(&counts.f_narrow(0, b, b)?)?;
                let shared = Tensor::f_cat(&[&shared, &shared], 0)?;
                let row_start = counts.f_cumsum(0, Kind::Int64)?.f_sub(&counts)?;
                let rows = positions.f_div_scalar_mode(t, "floor")?;
                let n = positions.size()[0];
                let rank =
                    Tensor::f_arange(n, (Kind::Int64, dev))?.f_sub(&row_start.f_index_select(0, &rows)?)?;
                let in_shared = rank.f_lt_tensor(&shared.f_index_select(0, &rows)?)?;
                Some((in_shared, alpha))
            }
        };
        Ok(Scored { target, scored, positions, shared, t })
    }

    /// LD-DPO's weight of each scored position (1 in the shared part, `alpha` in the tail);
    /// `None`: 1 everywhere.
    fn weight(&self) -> Result<Option<Tensor>, tch::TchError> {
        let Some((in_shared, alpha)) = &self.shared else { return Ok(None) };
        let ones = in_shared.f_ones_like()?.f_to_kind(Kind::Float)?;
        Ok(Some(ones.f_where_self(in_shared, &ones.f_mul_scalar(*alpha)?)?))
    }

    /// The row of each scored position.
    fn rows(&self) -> Result<Tensor, tch::TchError> {
        self.positions.f_div_scalar_mode(self.t, "floor")
    }

    /// At scored positions `start..start + len` of `flat [R * T, hidden]`: the logits and their
    /// log-softmax over the vocabulary `[len, vocab]` (f32, on the head's device), each
    /// position's target token and its log-prob.
    fn chunk(
        &self,
        model: &model_loader::CausalLm,
        flat: &Tensor,
        start: i64,
        len: i64,
    ) -> Result<Chunk, model_loader::Error> {
        let idx = self.positions.f_narrow(0, start, len)?;
        let logits = super::head::f32_logits(model, &flat.f_index_select(0, &idx)?)?;
        let target = self.target.f_index_select(0, &idx)?.f_to_device(logits.device())?;
        let (lp, log_z) = super::head::target_logps(&logits, &target)?;
        Ok(Chunk { logits, log_z, target, lp })
    }

    /// `[R, T]` per-position values (`lp`, one per scored position) summed per row as TRL sums its
    /// per-token log-probs: zeros elsewhere, one reduction over each row's `T - 1` predicting
    /// positions; with LD-DPO, the shared part's sum plus `alpha` times the tail's.
    fn row_sums(&self, lp: &Tensor, r: i64) -> Result<Tensor, tch::TchError> {
        let t = self.t;
        let dev = lp.device();
        let grid = |v: &Tensor| super::head::grid(v, &self.positions, r, t);
        let row = |x: &Tensor| x.f_sum_dim_intlist(&[1i64][..], false, Kind::Float);
        let per_token = grid(lp)?;
        match &self.shared {
            None => row(&per_token),
            Some((shared, alpha)) => {
                let ones = Tensor::f_ones([lp.size()[0]], (Kind::Float, dev))?;
                let shared = grid(&shared.f_to_device(dev)?.f_to_kind(Kind::Float)?)?;
                let tail = grid(&ones)?.f_sub(&shared)?;
                row(&per_token.f_mul(&shared)?)?.f_add(&row(&per_token.f_mul(&tail)?)?.f_mul_scalar(*alpha)?)
            }
        }
    }
}

/// One chunk of scored positions through the head.
struct Chunk {
    /// `[len, vocab]` f32.
    logits: Tensor,
    /// `[len]` each position's `log Σ exp(logits)`.
    log_z: Tensor,
    target: Tensor,
    lp: Tensor,
}

impl Chunk {
    /// `[len, vocab]` log-softmax of the logits.
    fn logp(&self) -> Result<Tensor, tch::TchError> {
        self.logits.f_sub(&self.log_z.f_unsqueeze(-1)?)
    }

    /// Per position, from the chunk's log-softmax `logp` ([`Chunk::logp`]): entropy, mean logit
    /// over the vocabulary, and 1 where the top-1 prediction is the target.
    fn stats(&self, logp: &Tensor) -> Result<[Tensor; 3], tch::TchError> {
        let entropy =
            logp.f_exp()?.f_mul(logp)?.f_sum_dim_intlist(&[-1i64][..], false, Kind::Float)?.f_neg()?;
        let mean_logits = self.logits.f_mean_dim(&[-1i64][..], false, Kind::Float)?;
        let top1 = super::head::top1_is_target(&self.logits, &self.target)?.f_to_kind(Kind::Float)?;
        Ok([entropy, mean_logits, top1])
    }
}

/// What [`sequence_logps`] computes besides the plain sums.
#[derive(Debug, Clone, Copy, Default)]
pub struct Scoring {
    /// LD-DPO's weight of each completion's tokens past the pair's shorter completion.
    pub ld_alpha: Option<f64>,
    /// The per-token statistics of TRL's logged metrics ([`TokenStats`]).
    pub stats: bool,
    /// WPO's sequence weights (`use_weighting`; kept with precomputed reference log-probs):
    /// without them or the statistics, a chunk's log-softmax is never formed.
    pub weights: bool,
}

/// The log-probs TRL's DPOTrainer sums: for each row of `input_ids [R, T]`, position `t`
/// scores token `t + 1` where `completion_mask[r, t + 1]` is 1 (prompt and padding score
/// nothing), from the last hidden states `h [R, T, hidden]` through the model's final norm and
/// head, in chunks of at most `chunk_bytes` of f32 logits (no `[R, T, vocab]` tensor). Without a
/// graph: the reference pass, precomputed reference log-probs, and the policy's sums before the
/// loss is differentiated.
pub fn sequence_logps(
    model: &model_loader::CausalLm,
    h: &Tensor,
    input_ids: &Tensor,
    completion_mask: &Tensor,
    chunk_bytes: i64,
    scoring: Scoring,
) -> Result<SequenceLogps, model_loader::Error> {
    let (with_stats, with_weights) = (scoring.stats, scoring.weights);
    tch::no_grad(|| {
        let size = h.size();
        let [r, t, hidden] = size[..] else {
            return Err(model_loader::Error::BadInput(format!(
                "hidden states must be [rows, seq, hidden], got {size:?}"
            )));
        };
        let dev = h.device();
        let flat = h.f_reshape([r * t, hidden])?;
        let s = Scored::new(input_ids, completion_mask, t, dev, scoring.ld_alpha)?;
        let (n, row_of) = (s.positions.size()[0], s.rows()?);
        let max_rows = (chunk_bytes / (4 * model.vocab_size().max(1))).max(1);
        let mut lps = Vec::new();
        let mut wpo = Tensor::f_zeros([r], (Kind::Float, dev))?;
        let zeros = || Tensor::f_zeros([r], (Kind::Float, dev));
        let mut stats = if with_stats { Some([zeros()?, zeros()?, zeros()?]) } else { None };
        let mut start = 0;
        while start < n {
            let len = max_rows.min(n - start);
            let c = s.chunk(model, &flat, start, len)?;
            let lp = c.lp.f_to_device(dev)?;
            let rows = row_of.f_narrow(0, start, len)?;
            lps.push(lp.shallow_clone());
            // The chunk's log-softmax, a pass over `len x vocab`, only for what needs it.
            let logp = if with_weights || with_stats { Some(c.logp()?) } else { None };
            if let (true, Some(logp)) = (with_weights, &logp) {
                let logsumsq = logp.f_mul_scalar(2.0)?.f_logsumexp(&[-1i64][..], false)?.f_to_device(dev)?;
                let _ = wpo.f_index_add_(0, &rows, &lp.f_sub(&logsumsq)?)?;
            }
            if let (Some(acc), Some(logp)) = (stats.as_mut(), &logp) {
                for (acc, per_position) in acc.iter_mut().zip(c.stats(logp)?) {
                    let _ = acc.f_index_add_(0, &rows, &per_position.f_to_device(dev)?)?;
                }
            }
            start += len;
        }
        let sums = if lps.is_empty() {
            Tensor::f_zeros([r], (Kind::Float, dev))?
        } else {
            s.row_sums(&Tensor::f_cat(&lps, 0)?, r)?
        };
        // TRL counts completion tokens on the unshifted mask, at least 1.
        let mask = completion_mask.f_to_device(dev)?.f_to_kind(Kind::Float)?;
        let tokens = mask.f_sum_dim_intlist(&[1i64][..], false, Kind::Float)?.f_clamp_min(1.0)?;
        let scored_per_row = s
            .scored
            .f_reshape([r, t])?
            .f_to_kind(Kind::Float)?
            .f_sum_dim_intlist(&[1i64][..], false, Kind::Float)?
            .f_clamp_min(1.0)?;
        let weights = if with_weights { Some(wpo.f_div(&scored_per_row)?.f_exp()?) } else { None };
        let stats = match stats {
            Some([entropy, mean_logits, top1]) => {
                // The zero-count floor of `scored_per_row` is for the weights only.
                let scored = s.scored.f_reshape([r, t])?.f_to_kind(Kind::Float)?.f_sum_dim_intlist(
                    &[1i64][..],
                    false,
                    Kind::Float,
                )?;
                Some(TokenStats { entropy, mean_logits, top1, scored })
            }
            None => None,
        };
        Ok(SequenceLogps { sums, tokens, weights, stats })
    })
}

/// One DPO micro-batch on the model's device: the B chosen sequences then the B rejected ones,
/// right-padded to one length (TRL's collated layout).
#[derive(Debug)]
pub struct DpoBatch {
    /// `[2B, T]` prompt + completion token ids.
    pub input_ids: Tensor,
    /// `[2B, T]` 1 on completion tokens, 0 on the prompt and padding.
    pub completion_mask: Tensor,
    /// `[2B, T]` 0 on tokens and -1 on padding, when the batch has any: the model then masks
    /// attention as transformers does for a padded batch (and runs grouped-query attention the
    /// way transformers does under a mask, which rounds the key/value gradients its way).
    pub segment_ids: Option<Tensor>,
    /// `padding_free`: the layers' linears, norms and MLPs run on the real tokens only, while
    /// attention keeps the padded layout ([`model_loader::CausalLm::context_skipping_padding`]).
    /// Every real token gets the same value as padded; only the rounding of products over a
    /// different number of rows differs, and with adapter dropout on (`disable_dropout: false`)
    /// the masks are drawn over the real tokens, so they differ from the padded layout's (TRL
    /// 1.16's DPOTrainer turns `padding_free` off and pads).
    pub skip_padding: bool,
}

impl DpoBatch {
    /// Pairs in the batch.
    pub fn pairs(&self) -> i64 {
        self.input_ids.size().first().copied().unwrap_or(0) / 2
    }

    /// [`Self::segment_ids`] on `device`.
    fn segments_on(&self, device: tch::Device) -> Result<Option<Tensor>, tch::TchError> {
        self.segment_ids.as_ref().map(|s| s.f_to_device(device)).transpose()
    }

    /// What a router loss over this batch masks: its padding, unless the layers skip it (the
    /// router then sees real tokens only).
    fn router_segments(&self) -> Option<&Tensor> {
        self.segment_ids.as_ref().filter(|_| !self.skip_padding)
    }
}

/// The reference model's log-probs of a batch, without a graph and without a second copy of the
/// base, as TRL 1.16 makes its reference under PEFT: a run that started from an existing adapter
/// (`initial`, its frozen values) scores with that adapter (TRL's "ref" adapter copy); a fresh
/// adapter's reference is the base with the adapters switched off (PEFT's `disable_adapter()`).
pub fn reference_logps(
    model: &model_loader::CausalLm,
    adapters: &lora::Adapters,
    initial: Option<&[Tensor]>,
    batch: &DpoBatch,
    scoring: Scoring,
) -> Result<SequenceLogps, Error> {
    let score = || -> Result<SequenceLogps, model_loader::Error> {
        // On the model's device, as the positions and mask built from them must be.
        let ids = batch.input_ids.f_to_device(model.device())?;
        let segments = batch.segments_on(model.device())?;
        let (h, _) = super::step::hidden_states_routed(
            model,
            &ids,
            None,
            segments.as_ref(),
            None,
            batch.skip_padding,
        )?;
        sequence_logps(model, &h, &ids, &batch.completion_mask, super::HEAD_CHUNK_BYTES, scoring)
    };
    // The reference is a fixed model: no dropout in it, whatever the policy's training mode.
    let training = adapters.is_training();
    adapters.set_training(false);
    let logps = match initial {
        Some(values) => adapters.with_values(values, score),
        None => adapters.without_adapters(score),
    };
    adapters.set_training(training);
    Ok(logps??)
}

/// What a DPO micro-batch gave: its loss (before the accumulation scale) and TRL's metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoStats {
    /// The micro-batch's loss.
    pub loss: f64,
    /// Rewards and log-probs, as TRL logs them.
    pub metrics: DpoMetrics,
}

/// Forward and backward of one DPO micro-batch against `reference` (its log-probs, from
/// [`reference_logps`] or precomputed): gradients of `loss * scale` accumulate into the trainable
/// tensors (`scale` = 1 / gradient accumulation steps, as transformers divides DPO's loss).
///
/// The head runs twice over chunks of completion positions, never holding `[2B, T, vocab]`
/// logits: once without a graph for each sequence's log-prob sum, from which the loss and its
/// gradient with respect to every sum follow; then again with a graph, back-propagating each
/// chunk's `Σ dL/d(sum of its sequence) · log p` at once. The layers below run through
/// [`super::step::Layers`] (checkpointing, dropout seeds) as SFT's do; with
/// [`DpoBatch::skip_padding`] on the batch's real tokens only (a `router` built for the batch,
/// `DpoBatch::router_segments`).
#[allow(clippy::too_many_arguments, reason = "the micro-batch's settings, each needed once")]
pub fn forward_backward(
    model: &model_loader::CausalLm,
    batch: &DpoBatch,
    reference: &SequenceLogps,
    objective: &DpoObjective,
    scale: f64,
    checkpointing: bool,
    seed: i64,
    router: Option<&super::router::RouterLoss>,
) -> Result<DpoStats, Error> {
    let b = batch.pairs();
    let ids = batch.input_ids.f_to_device(model.device()).map_err(model_loader::Error::from)?;
    let mask = batch.completion_mask.f_to_device(model.device()).map_err(model_loader::Error::from)?;
    let (r, t) = (2 * b, ids.size().get(1).copied().unwrap_or(0));
    let positions = tch::Tensor::f_arange(t, (Kind::Int64, ids.device()))
        .and_then(|p| p.f_expand([r, t], false))
        .map_err(model_loader::Error::from)?;
    let segments = batch.segments_on(model.device()).map_err(model_loader::Error::from)?;
    let layers = super::step::Layers {
        input_ids: &ids,
        position_ids: &positions,
        segment_ids: segments.as_ref(),
        checkpointing,
        seed,
        neftune_alpha: None,
        router,
        skip_padding: batch.skip_padding,
    };
    let mut outcome: Option<Result<DpoStats, Error>> = None;
    let stats = layers.forward_backward(model, |h| {
        let scoring = Scoring { ld_alpha: objective.ld_alpha, stats: true, weights: objective.use_weighting };
        let seq = sequence_logps(model, h, &ids, &mask, super::HEAD_CHUNK_BYTES, scoring)?;
        let torch = |e: tch::TchError| model_loader::Error::from(e);
        let leaf = seq.sums.f_detach().map_err(torch)?.set_requires_grad(true);
        let pair = pair_logps(objective, &leaf, &seq, reference, &mask).map_err(torch)?;
        let (loss, mut metrics) = match objective.loss(&pair) {
            Ok(x) => x,
            Err(e) => {
                outcome = Some(Err(e));
                return Ok((None, h.f_zeros_like().map_err(torch)?));
            }
        };
        if let Some(st) = &seq.stats {
            [metrics.logits_chosen, metrics.logits_rejected, metrics.entropy, metrics.mean_token_accuracy] =
                st.metrics(b).map_err(torch)?;
        }
        let value = loss.f_double_value(&[]).map_err(torch)?;
        loss.f_mul_scalar(scale).and_then(|l| l.f_backward()).map_err(torch)?;
        let per_sequence = leaf.grad();
        let grad = head_backward(model, h, &ids, &mask, &per_sequence, objective.ld_alpha)?;
        Ok((Some(DpoStats { loss: value, metrics }), grad))
    })?;
    match (outcome, stats) {
        (Some(Err(e)), _) => Err(e),
        (_, Some(s)) => Ok(s),
        _ => Err(Error::Loss("the DPO head produced no loss".into())),
    }
}

/// The pair view of one batch's sums (`sums`: the policy's, `[2B]`, with or without a graph) for
/// [`DpoObjective::loss`].
fn pair_logps(
    objective: &DpoObjective,
    sums: &Tensor,
    seq: &SequenceLogps,
    reference: &SequenceLogps,
    mask: &Tensor,
) -> Result<PairLogps, tch::TchError> {
    let b = sums.size().first().copied().unwrap_or(0) / 2;
    let t = mask.size().get(1).copied().unwrap_or(0);
    let dev = sums.device();
    let chosen = sums.f_narrow(0, 0, b)?;
    let rejected = sums.f_narrow(0, b, b)?;
    let chosen_nll = if objective.losses.iter().any(|(l, _)| *l == DpoLoss::Sft) {
        // TRL's sft term: the mean negative log-prob over every chosen completion token.
        let scored = mask.f_narrow(1, 1, t - 1)?.f_narrow(0, 0, b)?;
        let n = scored.f_sum(Kind::Float)?.f_clamp_min(1.0)?;
        Some(chosen.f_sum(Kind::Float)?.f_neg()?.f_div(&n.f_to_device(dev)?)?)
    } else {
        None
    };
    let on = |x: &Tensor, start: i64| x.f_narrow(0, start, b).and_then(|x| x.f_to_device(dev));
    Ok(PairLogps {
        chosen,
        rejected,
        ref_chosen: on(&reference.sums, 0)?,
        ref_rejected: on(&reference.sums, b)?,
        chosen_tokens: on(&seq.tokens, 0)?,
        rejected_tokens: on(&seq.tokens, b)?,
        chosen_nll,
        weights: if objective.use_weighting { seq.weights.as_ref().map(Tensor::shallow_clone) } else { None },
    })
}

/// DPO's eval set: pairs in dataset order, scored as TRL's evaluation scores them: each batch's
/// loss and metrics without gradients or dropout; `eval_loss` is the mean over pairs, each metric
/// the mean over batches, logged as `eval_<name>`.
pub struct DpoEval<'a> {
    /// The objective (its loss, adapters and reference).
    pub dpo: &'a Dpo<'a>,
    /// The eval batches with their pair counts.
    pub batches: Vec<(DpoMicroBatch, u64)>,
}

impl DpoEval<'_> {
    fn run(&self, model: &model_loader::CausalLm, step: u64) -> Result<(f64, Vec<f64>), Error> {
        let forward = |source: model_loader::Error| Error::Forward { step, source: Box::new(source) };
        let torch = |e: tch::TchError| forward(model_loader::Error::from(e));
        let (mut loss_sum, mut pairs) = (0.0, 0.0);
        let coef = self.dpo.router_aux_loss_coef;
        let names = if coef.is_some() { DPO_METRICS_AUX.len() } else { DPO_METRICS.len() };
        let mut metric_sums = vec![0.0; names];
        for (mb, n) in &self.batches {
            let (loss, m, aux) = self.dpo.with_reference(model, mb, |reference| {
                let ids = mb.batch.input_ids.f_to_device(model.device()).map_err(torch)?;
                let mask = mb.batch.completion_mask.f_to_device(model.device()).map_err(torch)?;
                let segments = mb.batch.segments_on(model.device()).map_err(torch)?;
                let router = match coef {
                    Some(c) => super::router::RouterLoss::for_batch(model, mb.batch.router_segments(), c)
                        .map_err(torch)?,
                    None => None,
                };
                let (h, aux) = super::step::hidden_states_routed(
                    model,
                    &ids,
                    None,
                    segments.as_ref(),
                    router.as_ref(),
                    mb.batch.skip_padding,
                )
                .map_err(forward)?;
                let scoring = Scoring {
                    ld_alpha: self.dpo.objective.ld_alpha,
                    stats: true,
                    weights: self.dpo.objective.use_weighting,
                };
                let seq = sequence_logps(model, &h, &ids, &mask, super::HEAD_CHUNK_BYTES, scoring)
                    .map_err(forward)?;
                let pair =
                    pair_logps(&self.dpo.objective, &seq.sums, &seq, reference, &mask).map_err(torch)?;
                let (loss, mut m) = tch::no_grad(|| self.dpo.objective.loss(&pair))?;
                if let Some(st) = &seq.stats {
                    [m.logits_chosen, m.logits_rejected, m.entropy, m.mean_token_accuracy] =
                        st.metrics(mb.batch.pairs()).map_err(torch)?;
                }
                Ok((loss.f_double_value(&[]).map_err(torch)?, m, aux))
            })?;
            // TRL adds `coef * aux` to each batch's loss (and logs aux beside its metrics).
            let routed = aux.zip(coef).map_or(0.0, |(a, c)| a * c);
            loss_sum += (loss + routed) * *n as f64;
            pairs += *n as f64;
            let values = m.values().into_iter().chain(aux);
            for (acc, v) in metric_sums.iter_mut().zip(values) {
                *acc += v;
            }
        }
        let batches = self.batches.len().max(1) as f64;
        Ok((loss_sum / pairs.max(1.0), metric_sums.into_iter().map(|s| s / batches).collect()))
    }
}

impl super::Evaluator for DpoEval<'_> {
    fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    fn evaluate(
        &self,
        model: &model_loader::CausalLm,
        step: u64,
        epoch: f64,
    ) -> Result<super::EvalEntry, Error> {
        let start = std::time::Instant::now();
        let adapters = self.dpo.adapters;
        let training = adapters.is_training();
        adapters.set_training(false);
        let result = self.run(model, step);
        adapters.set_training(training);
        let (eval_loss, values) = result?;
        if !eval_loss.is_finite() {
            return Err(Error::NonFiniteEval { step, loss: eval_loss });
        }
        let mut metrics: std::collections::BTreeMap<String, f64> =
            DPO_METRICS_AUX.iter().zip(&values).map(|(k, v)| (format!("eval_{k}"), *v)).collect();
        let accuracy = metrics.remove("eval_mean_token_accuracy").unwrap_or(0.0);
        Ok(super::EvalEntry {
            step,
            epoch,
            eval_loss,
            eval_mean_token_accuracy: accuracy,
            eval_runtime: start.elapsed().as_secs_f64(),
            metrics,
        })
    }
}

/// The head's second pass: back-propagate `Σ g[row] · log p(token)` over the scored positions,
/// chunk by chunk, into the head's trainable tensors; returns the gradient at `h`.
fn head_backward(
    model: &model_loader::CausalLm,
    h: &Tensor,
    input_ids: &Tensor,
    completion_mask: &Tensor,
    per_sequence: &Tensor,
    ld_alpha: Option<f64>,
) -> Result<Tensor, model_loader::Error> {
    let size = h.size();
    let [r, t, hidden] = size[..] else {
        return Err(model_loader::Error::BadInput(format!(
            "hidden states must be [rows, seq, hidden], got {size:?}"
        )));
    };
    let dev = h.device();
    let leaf = h.f_detach()?.set_requires_grad(true);
    let flat = leaf.f_reshape([r * t, hidden])?;
    let s = Scored::new(input_ids, completion_mask, t, dev, ld_alpha)?;
    let n = s.positions.size()[0];
    let coeff = per_sequence.f_to_device(dev)?.f_index_select(0, &s.rows()?)?;
    let coeff = match s.weight()? {
        Some(w) => coeff.f_mul(&w)?,
        None => coeff,
    };
    let max_rows = (super::HEAD_CHUNK_BYTES / (4 * model.vocab_size().max(1))).max(1);
    let mut start = 0;
    while start < n {
        let len = max_rows.min(n - start);
        let c = coeff.f_narrow(0, start, len)?;
        match model.frozen_head_weight() {
            // The head's own gradient, as TRL's chunked head computes it (the logits again, as
            // TRL's backward recomputes them); autograd for the norm below it.
            Some(weight) => {
                let idx = s.positions.f_narrow(0, start, len)?;
                let target = s.target.f_index_select(0, &idx)?;
                let _ = super::head::frozen_chunk(model, weight, &flat, &idx, &target, Some(&c))?;
            }
            None => {
                let lp = s.chunk(model, &flat, start, len)?.lp;
                lp.f_mul(&c.f_to_device(lp.device())?)?.f_sum(Kind::Float)?.f_backward()?;
            }
        }
        start += len;
    }
    let g = leaf.grad();
    Ok(if g.defined() { g } else { leaf.f_zeros_like()? })
}

/// DPO over the shared loop ([`super::Trainer::train_objective`]): each micro-batch's reference
/// log-probs are precomputed or taken from the same base with the adapters switched off.
pub struct Dpo<'a> {
    /// The loss.
    pub objective: DpoObjective,
    /// The policy's adapters (switched off, or set to `initial`, for the reference pass).
    pub adapters: &'a lora::Adapters,
    /// The frozen values of the adapter the run started from, when it started from one (see
    /// [`reference_logps`]).
    pub initial: Option<Vec<Tensor>>,
    /// A mixture of experts' router-loss coefficient (`None`: no router loss), as TRL's
    /// DPOTrainer adds `coef * aux` to the policy's loss.
    pub router_aux_loss_coef: Option<f64>,
}

impl Dpo<'_> {
    /// `f` on the batch's reference log-probs: the precomputed ones, else scored now
    /// ([`reference_logps`]).
    fn with_reference<R>(
        &self,
        model: &model_loader::CausalLm,
        b: &DpoMicroBatch,
        f: impl FnOnce(&SequenceLogps) -> Result<R, Error>,
    ) -> Result<R, Error> {
        match &b.reference {
            Some(r) => f(r),
            None => f(&super::clock::timed(super::clock::Phase::Reference, model.device(), || {
                reference_logps(
                    model,
                    self.adapters,
                    self.initial.as_deref(),
                    &b.batch,
                    // A reference's WPO weights are never used: only the policy's weigh the loss.
                    Scoring { ld_alpha: self.objective.ld_alpha, stats: false, weights: false },
                )
            })?),
        }
    }
}

/// A DPO micro-batch for the loop.
#[derive(Debug)]
pub struct DpoMicroBatch {
    /// The sequences.
    pub batch: DpoBatch,
    /// The reference's log-probs when precomputed (`precompute_ref_log_probs`).
    pub reference: Option<SequenceLogps>,
    /// Input tokens (pads excluded; the prompt counts once per sequence, as TRL counts).
    pub tokens: u64,
}

impl DpoMicroBatch {
    /// A micro-batch from a collated preference batch, its layers skipping the padding when
    /// `skip_padding` ([`DpoBatch::skip_padding`]).
    pub fn from_collated(
        b: &data::preference::PreferenceBatch,
        skip_padding: bool,
    ) -> Result<Self, tch::TchError> {
        let shape = [b.rows as i64, b.len as i64];
        Ok(DpoMicroBatch {
            batch: DpoBatch {
                input_ids: Tensor::f_from_slice(&b.input_ids)?.f_reshape(shape)?,
                completion_mask: Tensor::f_from_slice(&b.completion_mask)?.f_reshape(shape)?,
                segment_ids: if b.attention_mask.contains(&0) {
                    let segments: Vec<i64> = b.attention_mask.iter().map(|&m| m - 1).collect();
                    Some(Tensor::f_from_slice(&segments)?.f_reshape(shape)?)
                } else {
                    None
                },
                skip_padding,
            },
            reference: None,
            tokens: b.attention_mask.iter().map(|&m| m as u64).sum(),
        })
    }
}

/// The metrics DPO logs, in [`DpoMetrics`]' order, then a mixture of experts' router loss.
pub const DPO_METRICS_AUX: [&str; 11] = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
    "aux_loss",
];

/// The metrics DPO logs, in [`DpoMetrics`]' order.
pub const DPO_METRICS: &[&str] = DPO_METRICS_AUX.split_at(10).0;

impl super::Objective for Dpo<'_> {
    type Batch = DpoMicroBatch;

    fn metric_names(&self) -> &'static [&'static str] {
        if self.router_aux_loss_coef.is_some() { &DPO_METRICS_AUX } else { DPO_METRICS }
    }

    fn step(
        &self,
        model: &model_loader::CausalLm,
        b: &DpoMicroBatch,
        ctx: &super::MicroContext,
    ) -> Result<super::Micro, Error> {
        // transformers divides DPO's loss by the accumulation steps; ranks sum their gradients
        // here (DDP averages them), so each rank's share is also divided by their number.
        let scale = 1.0 / (ctx.grad_accum.max(1) * ctx.world.max(1)) as f64;
        // TRL adds `coef * aux` to the policy's loss, divided as the loss is.
        let router = match self.router_aux_loss_coef {
            Some(coef) => {
                super::router::RouterLoss::for_batch(model, b.batch.router_segments(), coef * scale)
                    .map_err(model_loader::Error::from)?
            }
            None => None,
        };
        let s = self.with_reference(model, b, |reference| {
            forward_backward(
                model,
                &b.batch,
                reference,
                &self.objective,
                scale,
                ctx.checkpointing,
                ctx.seed,
                router.as_ref(),
            )
        })?;
        let m = s.metrics;
        let aux = router.as_ref().and_then(|r| r.value.get().map(|v| (v, r.scale)));
        let mut metrics: Vec<Option<f64>> = m.values().into_iter().map(Some).collect();
        if self.router_aux_loss_coef.is_some() {
            metrics.push(aux.map(|(v, _)| v));
        }
        Ok(super::Micro {
            loss: s.loss * scale + aux.map_or(0.0, |(v, sc)| v * sc),
            metrics,
            tokens: b.tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn tensor(v: &Value) -> Tensor {
        let xs: Vec<f32> =
            v.as_array().expect("list").iter().map(|x| x.as_f64().expect("number") as f32).collect();
        Tensor::from_slice(&xs)
    }

    fn objective(cfg: &Value) -> DpoObjective {
        let num = |k: &str, d: f64| cfg.get(k).and_then(Value::as_f64).unwrap_or(d);
        let names = cfg["loss_type"].as_array().expect("loss_type");
        let weights: Vec<f64> = cfg
            .get("loss_weights")
            .and_then(Value::as_array)
            .map(|w| w.iter().map(|x| x.as_f64().expect("weight")).collect())
            .unwrap_or_else(|| vec![1.0; names.len()]);
        let parse = |s: &str| DpoLoss::VALUES.iter().copied().find(|l| l.as_str() == s).expect("known loss");
        let f = cfg.get("f_divergence_type").and_then(Value::as_str).unwrap_or("reverse_kl");
        DpoObjective {
            beta: num("beta", 0.1),
            label_smoothing: num("label_smoothing", 0.0),
            discopop_tau: num("discopop_tau", 0.05),
            f_divergence: FDivergence::VALUES
                .iter()
                .copied()
                .find(|d| d.as_str() == f)
                .expect("known divergence"),
            alpha_coef: num("f_alpha_divergence_coef", 0.5),
            losses: names.iter().map(|n| parse(n.as_str().expect("name"))).zip(weights).collect(),
            use_weighting: cfg.get("use_weighting").and_then(Value::as_bool).unwrap_or(false),
            ld_alpha: cfg.get("ld_alpha").and_then(Value::as_f64),
        }
    }

    fn close(ours: f64, theirs: f64) -> bool {
        (ours - theirs).abs() <= 2e-5 * theirs.abs().max(1e-3)
    }

    /// Every loss type, option and metric against TRL 1.16's own `compute_loss` on the same
    /// log-probs (scripts/golden_dpo_loss.py).
    #[test]
    fn losses_and_metrics_match_trl() {
        let golden: Value =
            serde_json::from_str(include_str!("../../tests/golden/dpo_loss.json")).expect("golden JSON");
        let i = &golden["inputs"];
        let p = PairLogps {
            chosen: tensor(&i["chosen"]),
            rejected: tensor(&i["rejected"]),
            ref_chosen: tensor(&i["ref_chosen"]),
            ref_rejected: tensor(&i["ref_rejected"]),
            chosen_tokens: tensor(&i["chosen_tokens"]),
            rejected_tokens: tensor(&i["rejected_tokens"]),
            chosen_nll: Some(Tensor::from(i["chosen_nll"].as_f64().expect("nll") as f32)),
            weights: Some(tensor(&i["weights"])),
        };
        let cases = golden["cases"].as_array().expect("cases");
        assert!(cases.len() >= 26);
        for case in cases {
            let obj = objective(&case["config"]);
            obj.check().expect("a configuration TRL accepts");
            let (loss, m) = obj.loss(&p).expect("loss");
            let (ours, theirs) = (loss.double_value(&[]), case["loss"].as_f64().expect("loss"));
            assert!(close(ours, theirs), "{}: loss {ours} vs TRL {theirs}", case["config"]);
            let want = &case["metrics"];
            for (name, got) in [
                ("rewards/chosen", m.rewards_chosen),
                ("rewards/rejected", m.rewards_rejected),
                ("rewards/accuracies", m.rewards_accuracies),
                ("rewards/margins", m.rewards_margins),
                ("logps/chosen", m.logps_chosen),
                ("logps/rejected", m.logps_rejected),
            ] {
                let w = want[name].as_f64().expect("metric");
                assert!(close(got, w), "{}: {name} {got} vs TRL {w}", case["config"]);
            }
        }
    }

    /// nibble's log-probs of the shipped tiny model over TRL's collated batch are the reference
    /// log-probs TRL computed with the same model (and WPO's weights for the same sequences agree
    /// in kind: recorded for the noised policy, so only their shape is checked here).
    #[test]
    fn sequence_logps_match_the_reference_model() {
        let golden: Value =
            serde_json::from_str(include_str!("../../tests/golden/dpo_loss.json")).expect("golden JSON");
        let i = &golden["inputs"];
        let matrix = |v: &Value| {
            let rows: Vec<Vec<i64>> = serde_json::from_value(v.clone()).expect("matrix");
            let (r, t) = (rows.len() as i64, rows[0].len() as i64);
            Tensor::from_slice(&rows.concat()).reshape([r, t])
        };
        let (ids, mask) = (matrix(&i["input_ids"]), matrix(&i["completion_mask"]));
        let model = tiny_f32();
        let h = tch::no_grad(|| model.hidden_states(&ids, None, None)).expect("forward");
        // A small chunk size, so several chunks (and rows split across them) are exercised.
        let scoring = Scoring { ld_alpha: None, stats: true, weights: true };
        let got =
            sequence_logps(&model, &h, &ids, &mask, 4 * model.vocab_size() * 7, scoring).expect("logps");
        let want: Vec<f64> = [&i["ref_chosen"], &i["ref_rejected"]]
            .iter()
            .flat_map(|v| v.as_array().expect("list").iter().map(|x| x.as_f64().expect("number")))
            .collect();
        let sums: Vec<f64> =
            Vec::<f32>::try_from(&got.sums).expect("sums").into_iter().map(f64::from).collect();
        for (ours, theirs) in sums.iter().zip(&want) {
            assert!((ours - theirs).abs() <= 1e-5 * theirs.abs(), "{sums:?} vs {want:?}");
        }
        let tokens: Vec<f32> = Vec::<f32>::try_from(&got.tokens).expect("tokens");
        let want_tokens: Vec<f32> = [&i["chosen_tokens"], &i["rejected_tokens"]]
            .iter()
            .flat_map(|v| v.as_array().expect("list").iter().map(|x| x.as_f64().expect("n") as f32))
            .collect();
        assert_eq!(tokens, want_tokens);
        let w: Vec<f32> =
            Vec::<f32>::try_from(got.weights.as_ref().expect("weights asked for")).expect("weights");
        assert!(w.len() == 6 && w.iter().all(|x| *x > 0.0 && *x <= 1.0), "{w:?}");
    }

    /// The shipped tiny model in f32.
    fn tiny_f32() -> model_loader::CausalLm {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama");
        let opts = model_loader::LoadOptions { dtype: Kind::Float, ..Default::default() };
        model_loader::CausalLm::load(&dir, &opts, &mut |_, _| {}).expect("tiny model")
    }

    /// Rank-4 adapters (alpha 8) on every linear of `model`, PEFT's default init with seed 3.
    fn rank4_adapters(model: &mut model_loader::CausalLm) -> lora::Adapters {
        let cfg = lora::LoraConfig::new(4, 8.0, lora::TargetModules::AllLinear);
        lora::inject(model.linears_mut(), &cfg, 3).expect("adapters")
    }

    fn golden_batch(golden: &Value) -> DpoBatch {
        let matrix = |v: &Value| {
            let rows: Vec<Vec<i64>> = serde_json::from_value(v.clone()).expect("matrix");
            let (r, t) = (rows.len() as i64, rows[0].len() as i64);
            Tensor::from_slice(&rows.concat()).reshape([r, t])
        };
        DpoBatch {
            input_ids: matrix(&golden["inputs"]["input_ids"]),
            completion_mask: matrix(&golden["inputs"]["completion_mask"]),
            segment_ids: None,
            skip_padding: false,
        }
    }

    fn zero_grads(a: &lora::Adapters) {
        for p in a.parameters() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    fn grads(a: &lora::Adapters) -> Vec<Tensor> {
        a.parameters().iter().map(|p| p.grad().copy()).collect()
    }

    fn max_rel(a: &[Tensor], b: &[Tensor]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| {
                let scale = y.abs().max().double_value(&[]).max(1e-12);
                (x - y).abs().max().double_value(&[]) / scale
            })
            .fold(0.0, f64::max)
    }

    /// The two-pass chunked head gives the gradients autograd gives for the whole loss over full
    /// logits, with and without gradient checkpointing; the reference pass (adapters off) gives
    /// the shipped model's log-probs TRL recorded.
    #[test]
    fn the_chunked_step_gives_the_gradients_of_the_whole_loss() {
        let golden: Value =
            serde_json::from_str(include_str!("../../tests/golden/dpo_loss.json")).expect("golden JSON");
        let batch = golden_batch(&golden);
        let mut model = tiny_f32();
        let mut cfg = lora::LoraConfig::new(4, 8.0, lora::TargetModules::AllLinear);
        cfg.init = lora::LoraInit::False;
        let adapters = lora::inject(model.linears_mut(), &cfg, 3).expect("adapters");
        let reference =
            reference_logps(&model, &adapters, None, &batch, Scoring::default()).expect("reference");
        let want: Vec<f64> = ["ref_chosen", "ref_rejected"]
            .iter()
            .flat_map(|k| {
                golden["inputs"][k].as_array().expect("list").iter().map(|x| x.as_f64().expect("n"))
            })
            .collect();
        let got: Vec<f32> = Vec::<f32>::try_from(&reference.sums).expect("sums");
        for (g, w) in got.iter().zip(&want) {
            assert!((f64::from(*g) - w).abs() <= 1e-5 * w.abs(), "{got:?} vs {want:?}");
        }
        let objective = DpoObjective {
            losses: vec![(DpoLoss::Sigmoid, 1.0), (DpoLoss::Sft, 0.5), (DpoLoss::Ipo, 0.25)],
            ..Default::default()
        };
        let scale = 0.5;
        let step = |checkpointing: bool| {
            zero_grads(&adapters);
            let s = forward_backward(&model, &batch, &reference, &objective, scale, checkpointing, 7, None)
                .expect("step");
            (s, grads(&adapters))
        };
        let (plain, g_plain) = step(false);
        let (checkpointed, g_ckpt) = step(true);
        // The whole loss over full [2B, T, vocab] logits, differentiated by autograd.
        zero_grads(&adapters);
        let (ids, mask) = (&batch.input_ids, &batch.completion_mask);
        let (r, t) = (ids.size()[0], ids.size()[1]);
        let b = r / 2;
        let logp = model.forward(ids, None, None).expect("forward").log_softmax(-1, Kind::Float);
        let lp =
            logp.narrow(1, 0, t - 1).gather(2, &ids.narrow(1, 1, t - 1).unsqueeze(2), false).squeeze_dim(2);
        let scored = mask.narrow(1, 1, t - 1).to_kind(Kind::Float);
        let lp = lp * &scored;
        let sums = lp.sum_dim_intlist(&[1i64][..], false, Kind::Float);
        let tokens =
            mask.to_kind(Kind::Float).sum_dim_intlist(&[1i64][..], false, Kind::Float).clamp_min(1.0);
        let nll = -(lp.narrow(0, 0, b).sum(Kind::Float) / scored.narrow(0, 0, b).sum(Kind::Float));
        let pair = PairLogps {
            chosen: sums.narrow(0, 0, b),
            rejected: sums.narrow(0, b, b),
            ref_chosen: reference.sums.narrow(0, 0, b),
            ref_rejected: reference.sums.narrow(0, b, b),
            chosen_tokens: tokens.narrow(0, 0, b),
            rejected_tokens: tokens.narrow(0, b, b),
            chosen_nll: Some(nll),
            weights: None,
        };
        let (loss, metrics) = objective.loss(&pair).expect("loss");
        (loss.shallow_clone() * scale).backward();
        let g_whole = grads(&adapters);
        let whole = loss.double_value(&[]);
        assert!((plain.loss - whole).abs() <= 1e-5 * whole.abs(), "{} vs {whole}", plain.loss);
        assert_eq!(plain.metrics.rewards_accuracies, metrics.rewards_accuracies);
        assert!(max_rel(&g_plain, &g_whole) < 1e-4, "chunked vs whole: {}", max_rel(&g_plain, &g_whole));
        assert!(max_rel(&g_ckpt, &g_plain) < 1e-5, "checkpointed vs not: {}", max_rel(&g_ckpt, &g_plain));
        assert_eq!(checkpointed.loss, plain.loss);
        assert!(
            g_plain.iter().all(|g| g.abs().sum(Kind::Float).double_value(&[]) > 0.0),
            "every adapter learns"
        );
    }

    /// The text pairs of the data golden as collated micro-batches of `per` pairs (their layers
    /// skipping the padding when `skip_padding`).
    fn text_pairs(per: usize, skip_padding: bool) -> Vec<(DpoMicroBatch, u64)> {
        let golden: Value =
            serde_json::from_str(include_str!("../../../data/tests/golden/dpo_data.json")).expect("golden");
        let rows = golden["groups"]["text_explicit"]["rows"].as_array().expect("rows").clone();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama");
        let tok = data::Tokenizer::from_dir(&dir).expect("tokenizer");
        let (ids, _) = data::preference::prepare_preferences(
            &rows,
            &tok,
            None,
            None,
            config::types::TruncationMode::KeepStart,
        )
        .expect("rows");
        let pad = i64::from(tok.pad_token_id().expect("pad"));
        ids.chunks(per)
            .map(|c| {
                let refs: Vec<&data::preference::PreferenceIds> = c.iter().collect();
                let b = data::preference::collate_preferences(
                    &refs,
                    pad,
                    None,
                    config::types::TruncationMode::KeepStart,
                    None,
                );
                (DpoMicroBatch::from_collated(&b, skip_padding).expect("batch"), c.len() as u64)
            })
            .collect()
    }

    /// `padding_free`: layers that skip a batch's padding give the padded layout's reference
    /// log-probs, loss and adapter gradients (to f32 rounding), with and without checkpointing.
    #[test]
    fn skipping_padding_gives_the_padded_step() {
        let mut model = tiny_f32();
        let adapters = rank4_adapters(&mut model);
        // B starts at zero: give it values so the adapters change the reference and the policy.
        tch::no_grad(|| {
            let _rng = lora::global_rng();
            tch::manual_seed(11);
            for mut p in adapters.parameters() {
                let _ = p.f_add_(&(p.randn_like() * 0.02)).expect("perturb");
            }
        });
        // The reference is the base alone (adapters off), so policy and reference differ.
        let objective = DpoObjective::default();
        let (padded, skipped) = (text_pairs(3, false), text_pairs(3, true));
        assert!(
            padded.iter().any(|(b, _)| b.batch.segment_ids.is_some()),
            "the golden's batches have padding"
        );
        for ((p, _), (s, _)) in padded.iter().zip(&skipped) {
            let mut out = Vec::new();
            for (mb, checkpointing) in [(p, false), (s, false), (s, true)] {
                zero_grads(&adapters);
                let reference = reference_logps(&model, &adapters, None, &mb.batch, Scoring::default())
                    .expect("reference");
                let st =
                    forward_backward(&model, &mb.batch, &reference, &objective, 1.0, checkpointing, 7, None)
                        .expect("step");
                out.push((reference.sums, st.loss, grads(&adapters)));
            }
            let (want_ref, want_loss, want_grads) = &out[0];
            assert!((want_loss - std::f64::consts::LN_2).abs() > 1e-4, "policy and reference differ");
            for (got_ref, got_loss, got_grads) in &out[1..] {
                assert!(max_rel(std::slice::from_ref(got_ref), std::slice::from_ref(want_ref)) < 1e-5);
                assert!((got_loss - want_loss).abs() <= 1e-5 * want_loss.abs(), "{got_loss} vs {want_loss}");
                let err = max_rel(got_grads, want_grads);
                assert!(err < 1e-4, "adapter gradients differ by {err:e}");
            }
        }
        // An evaluation over the same batches, too.
        use super::super::Evaluator;
        let dpo = Dpo { objective, adapters: &adapters, initial: None, router_aux_loss_coef: None };
        let eval = |batches| DpoEval { dpo: &dpo, batches }.evaluate(&model, 1, 0.5).expect("evaluation");
        let (want, got) = (eval(padded), eval(skipped));
        assert!((want.eval_loss - std::f64::consts::LN_2).abs() > 1e-4, "policy and reference differ");
        assert!((got.eval_loss - want.eval_loss).abs() <= 1e-5 * want.eval_loss.abs());
        let (w, g) = (serde_json::to_value(&want).expect("json"), serde_json::to_value(&got).expect("json"));
        for (k, v) in w.as_object().expect("object").iter().filter(|(k, _)| k.starts_with("eval_rewards")) {
            let (a, b) = (v.as_f64().expect("number"), g[k].as_f64().expect("number"));
            assert!((a - b).abs() <= 1e-5 * a.abs().max(1e-3), "{k}: {b} vs {a}");
        }
    }

    /// A DPO evaluation reports exactly the metrics the plan lets `metric_for_best_model` name.
    #[test]
    fn a_dpo_evaluation_reports_the_names_the_plan_checks() {
        use super::super::Evaluator;
        let mut model = tiny_f32();
        let adapters = rank4_adapters(&mut model);
        let dpo = Dpo {
            objective: DpoObjective::default(),
            adapters: &adapters,
            initial: None,
            router_aux_loss_coef: None,
        };
        let entry = DpoEval { dpo: &dpo, batches: text_pairs(2, false) }
            .evaluate(&model, 1, 0.5)
            .expect("evaluation");
        let names = |entry: &super::super::EvalEntry| {
            let json = serde_json::to_value(entry).expect("json");
            let mut keys: Vec<String> = json
                .as_object()
                .expect("object")
                .keys()
                .filter(|k| k.starts_with("eval_"))
                .cloned()
                .collect();
            keys.sort();
            keys
        };
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        assert_eq!(names(&entry), sorted(super::super::eval_metric_names(true, false)));
        // SFT's, on the same model.
        let sft = crate::train::SftEval(&[], None).evaluate(&model, 1, 0.5).expect("evaluation");
        assert_eq!(names(&sft), sorted(super::super::eval_metric_names(false, false)));
    }

    fn dpo_run(per: usize, grad_accum: usize, steps: u64) -> (Vec<Tensor>, Vec<report::LogEntry>) {
        let mut model = tiny_f32();
        let adapters = rank4_adapters(&mut model);
        let topts = super::super::TrainOptions {
            total_steps: steps,
            grad_accum,
            learning_rate: 5e-3,
            schedule: super::super::Schedule::new(
                &config::types::Scheduler::Constant,
                None,
                5e-3,
                0.0,
                steps,
            )
            .expect("schedule"),
            adam: super::super::AdamWConfig {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
                fused: true,
            },
            max_grad_norm: 1.0,
            logging_steps: 1,
            logging_first_step: true,
            save_steps: None,
            save_total_limit: None,
            output_dir: std::env::temp_dir().join(format!("nibble-dpo-loop-{}", std::process::id())),
            gradient_checkpointing: false,
            seed: 42,
            eval_steps: None,
            eval_on_start: false,
            neftune_noise_alpha: None,
            router_aux_loss_coef: None,
            state: Default::default(),
            best: None,
        };
        let mut trainer = super::super::Trainer::new(&model, adapters.parameters(), topts).expect("trainer");
        let dpo = Dpo {
            objective: DpoObjective::default(),
            adapters: &adapters,
            initial: None,
            router_aux_loss_coef: None,
        };
        let outcome = trainer
            .train_objective(
                &dpo,
                &mut |_| text_pairs(per, false),
                &crate::train::SftEval(&[], None),
                &|_| Ok(()),
                &mut |_| {},
            )
            .expect("train");
        assert_eq!(outcome, super::super::Outcome::Finished);
        let params = adapters.parameters().iter().map(Tensor::copy).collect();
        (params, trainer.progress.log_history.clone())
    }

    /// DPO on the shared loop learns (the margin grows from 0, the loss falls from ln 2) and logs
    /// TRL's metric names; accumulating two one-pair micro-batches trains the adapter that one
    /// two-pair micro-batch trains.
    #[test]
    fn dpo_trains_on_the_shared_loop_and_accumulates_as_one_batch() {
        let (whole, log) = dpo_run(2, 1, 4);
        assert!(
            (log[0].loss - std::f64::consts::LN_2).abs() < 1e-5,
            "step 1 starts at ln 2: {}",
            log[0].loss
        );
        let last = log.last().expect("logs");
        assert!(last.loss < log[0].loss, "{:?}", log.iter().map(|e| e.loss).collect::<Vec<_>>());
        assert!(last.metrics["rewards/margins"] > 0.0, "{:?}", last.metrics);
        // TRL's names: rewards, log-probs, logits and entropy; the accuracy has its own field.
        assert_eq!(last.metrics.len(), 9, "{:?}", last.metrics.keys());
        assert!(last.metrics.contains_key("logits/chosen") && last.metrics.contains_key("entropy"));
        assert!(last.mean_token_accuracy.is_some_and(|a| (0.0..=1.0).contains(&a)));
        let (accumulated, log2) = dpo_run(1, 2, 4);
        // Float noise only (the batches pad differently, so attention sums in another order),
        // which Adam's first steps amplify to about 1e-4; a lost or doubled micro-batch turns
        // the update's direction.
        assert!(max_rel(&accumulated, &whole) < 1e-3, "{}", max_rel(&accumulated, &whole));
        assert!((log2[0].loss - log[0].loss).abs() < 1e-6);
    }

    #[test]
    fn gradients_flow_to_the_policy_only() {
        let chosen = Tensor::from_slice(&[-10.0f32, -12.0]).set_requires_grad(true);
        let rejected = Tensor::from_slice(&[-11.0f32, -9.0]).set_requires_grad(true);
        let p = PairLogps {
            chosen: chosen.shallow_clone(),
            rejected: rejected.shallow_clone(),
            ref_chosen: Tensor::from_slice(&[-10.5f32, -11.0]),
            ref_rejected: Tensor::from_slice(&[-10.0f32, -10.0]),
            chosen_tokens: Tensor::from_slice(&[4.0f32, 5.0]),
            rejected_tokens: Tensor::from_slice(&[3.0f32, 6.0]),
            chosen_nll: None,
            weights: None,
        };
        let (loss, m) = DpoObjective::default().loss(&p).expect("loss");
        loss.backward();
        // d/dc of mean(-log sigmoid(beta (c - r - c0 + r0))) = -beta sigmoid(-z) / B: negative.
        assert!(chosen.grad().double_value(&[0]) < 0.0 && rejected.grad().double_value(&[0]) > 0.0);
        assert_eq!(m.rewards_accuracies, 0.5);
    }

    #[test]
    fn what_trl_refuses_is_refused_before_training() {
        fn with(losses: Vec<DpoLoss>, f: impl FnOnce(&mut DpoObjective)) -> Result<(), String> {
            let mut o =
                DpoObjective { losses: losses.into_iter().map(|l| (l, 1.0)).collect(), ..Default::default() };
            f(&mut o);
            o.check()
        }
        assert!(with(vec![DpoLoss::ExoPair], |_| ()).is_err(), "exo_pair without label smoothing");
        assert!(with(vec![DpoLoss::Aot], |o| o.use_weighting = true).is_err());
        assert!(with(vec![DpoLoss::Sigmoid, DpoLoss::Sft], |o| o.use_weighting = true).is_err());
        assert!(with(vec![DpoLoss::BcoPair], |o| o.f_divergence = FDivergence::ForwardKl).is_err());
        assert!(with(vec![], |_| ()).is_err());
        assert!(with(vec![DpoLoss::Sigmoid, DpoLoss::Sft], |_| ()).is_ok(), "RPO");
    }
}
