//! Routing replay for mixture-of-experts models (Qwen3-MoE): the generator's KV-cache decode
//! records the experts it chose for every token; a full forward (the trainer's pass) replaying
//! them gives the generator's log-probs, even where the router on its own would pick other
//! experts. The case is built so that it does: in layer 0, experts 0 and 1 have routers that
//! differ by ~1e-6 and tie for second place on about half the tokens, so the last-bit differences
//! between the cached decode and the full forward flip the choice.

use rlrun_model::{build_model, CacheWrite, Device, Kind, KvCache, ModelFiles, Routing};
use rlrun_testkit::{fixtures, flipping_router, max_abs_diff};
use tch::Tensor;

#[test]
fn replayed_routing_gives_the_generators_logprobs_where_the_router_flips() {
    let _guard = tch::no_grad_guard();
    let files = ModelFiles::open(&fixtures().join("tiny-qwen3moe")).unwrap();
    let weights = files.load_weights(Kind::Float, Device::Cpu).unwrap();
    // Layer 0's router flips on last-bit differences (see `flipping_router`).
    let spec = weights
        .layout
        .param("model.layers.0.mlp.gate.weight")
        .unwrap()
        .clone();
    flipping_router(&mut weights.layout.param_view(&weights.flat, &spec).unwrap());
    let model = build_model(files.config.clone(), &weights).unwrap();

    // Sequences of 3 rows x 40 tokens: a 6-token prompt, then one token per decode step.
    let (b, t, p) = (3i64, 40i64, 6i64);
    let ids = Tensor::randint_low(3, 384, [b, t], (Kind::Int64, Device::Cpu));
    let mut cache = KvCache::new(model.config(), b, t, Kind::Float, Device::Cpu).unwrap();
    let slots_host: Vec<i64> = (0..b).collect();
    let slots = Tensor::from_slice(&slots_host);
    let generator = Routing::default();
    let mut routes = Vec::new();
    let mut logits = Vec::new();
    let mut start = 0;
    for len in std::iter::once(p).chain(std::iter::repeat_n(1, (t - p - 1) as usize)) {
        let hidden = model
            .forward_cached_routed(
                &ids.narrow(1, start, len),
                &mut cache,
                &CacheWrite {
                    slots: &slots,
                    slots_host: &slots_host,
                    start: &vec![start; b as usize],
                    lens: &vec![len; b as usize],
                },
                &generator,
            )
            .unwrap();
        routes.push(generator.recorded(0).unwrap().unwrap()); // (B, len, M, k)
        logits.push(model.logits(&hidden).unwrap());
        start += len;
    }
    let gen_logits = Tensor::cat(&logits, 1); // (B, T - 1, V): predictions of tokens 1..T
    let gen_routes = Tensor::cat(&routes, 1); // (B, T - 1, M, k)
    assert_eq!(gen_routes.size(), [b, t - 1, 2, 2]);
    let logprobs = |l: &Tensor| {
        l.log_softmax(-1, Kind::Float)
            .gather(2, &ids.narrow(1, 1, t - 1).unsqueeze(2), false)
            .squeeze_dim(2)
    };
    let gen_lp = logprobs(&gen_logits);

    // The trainer's full forward, without and with replay (the last token's routing is not
    // needed: -1 lets the router choose).
    let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu))
        .unsqueeze(0)
        .expand([b, t], false);
    let replay = Tensor::cat(
        &[
            gen_routes,
            Tensor::full([b, 1, 2, 2], -1, (Kind::Int64, Device::Cpu)),
        ],
        1,
    );
    let run = |routing: Routing| {
        let pass = model
            .pass_full(&positions, None)
            .unwrap()
            .with_routing(routing);
        let h = model
            .run_layers(&pass, model.embed(&[&ids]).unwrap())
            .unwrap()
            .remove(0);
        let lp = logprobs(&model.logits(&h.narrow(1, 0, t - 1)).unwrap());
        (
            lp,
            pass.routing.flips(),
            pass.routing.recorded(0).unwrap().unwrap(),
        )
    };
    let (free_lp, _, free_routes) = run(Routing::default());
    let (replay_lp, (flipped, replayed), used) =
        run(Routing::replay(vec![Some(replay.shallow_clone())]));
    let free_diff = max_abs_diff(&free_lp, &gen_lp);
    let replay_diff = max_abs_diff(&replay_lp, &gen_lp);
    let differ = free_routes
        .narrow(1, 0, t - 1)
        .sort(-1, false)
        .0
        .ne_tensor(&replay.narrow(1, 0, t - 1).sort(-1, false).0)
        .any_dim(-1, false)
        .sum(Kind::Int64)
        .int64_value(&[]);
    eprintln!(
        "router flips without replay: {flipped} of {replayed} token-layer routings ({:.1}%); \
         max |Δ logprob| generator vs trainer: {free_diff:e} without replay, {replay_diff:e} with",
        100.0 * flipped as f64 / replayed as f64
    );
    assert_eq!(
        replayed,
        b * (t - 1) * 2,
        "every recorded routing is replayed"
    );
    assert!(flipped > 0, "the constructed case should flip the router");
    // A flip in layer 0 changes what layer 2 sees, so the free run can differ in more places.
    assert!(
        differ >= flipped,
        "{differ} routings differ, {flipped} flips counted"
    );
    assert!(
        free_diff > 1e-4,
        "without replay the log-probs differ: {free_diff:e}"
    );
    assert!(
        replay_diff <= 1e-5,
        "with replay: max |Δ logprob| = {replay_diff:e}"
    );
    assert!(
        used.narrow(1, 0, t - 1).equal(&replay.narrow(1, 0, t - 1)),
        "replayed experts used"
    );
}
