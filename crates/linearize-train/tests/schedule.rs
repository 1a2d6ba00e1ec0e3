//! Learning-rate curves, plateau reductions, config parsing and resume.
use linearize_train::schedule::{Schedule, ScheduleConfig, ScheduleState};
use std::f64::consts::PI;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * (1.0 + b.abs())
}

fn plateau(warmup_steps: u64, patience: u32, cooldown: u32, min_lr: f64) -> ScheduleConfig {
    ScheduleConfig::Plateau {
        warmup_steps,
        factor: 0.5,
        patience,
        threshold: 0.01,
        cooldown,
        min_lr,
    }
}

#[test]
fn constant_with_warmup() {
    let s = Schedule::new(ScheduleConfig::Constant { warmup_steps: 4 }, 0.1, 100).unwrap();
    let lrs: Vec<f64> = (0..6).map(|step| s.lr(step)).collect();
    for (lr, expected) in lrs.iter().zip([0.025, 0.05, 0.075, 0.1, 0.1, 0.1]) {
        assert!(close(*lr, expected), "{lrs:?}");
    }
    assert_eq!(s.lr(10_000), 0.1);
    let no_warmup = Schedule::new(ScheduleConfig::Constant { warmup_steps: 0 }, 0.1, 100).unwrap();
    assert_eq!(no_warmup.lr(0), 0.1);
}

#[test]
fn cosine_warms_up_then_decays_to_the_floor() {
    let (peak, warmup, total, ratio) = (1e-3, 10, 110, 0.1);
    let s = Schedule::new(
        ScheduleConfig::Cosine {
            warmup_steps: warmup,
            min_lr_ratio: ratio,
        },
        peak,
        total,
    )
    .unwrap();
    assert!(close(s.lr(0), peak / 10.0));
    assert!(close(s.lr(9), peak));
    assert!(close(s.lr(10), peak), "decay starts at the peak");
    // Half-way through the decay: the midpoint between peak and floor.
    assert!(close(s.lr(60), peak * (ratio + (1.0 - ratio) * 0.5)));
    for step in [10u64, 35, 77, 109] {
        let progress = (step - warmup) as f64 / (total - warmup) as f64;
        let expected = peak * (ratio + (1.0 - ratio) * 0.5 * (1.0 + (PI * progress).cos()));
        assert!(close(s.lr(step), expected), "step {step}");
    }
    assert!(close(s.lr(110), peak * ratio));
    assert!(
        close(s.lr(500), peak * ratio),
        "stays at the floor past the end"
    );
    let lrs: Vec<f64> = (10..=110).map(|step| s.lr(step)).collect();
    assert!(lrs.windows(2).all(|w| w[1] <= w[0]), "monotone decay");
}

#[test]
fn plateau_reduces_after_patience_and_respects_floor_and_cooldown() {
    let mut s = Schedule::new(plateau(0, 2, 1, 0.3), 1.0, 1000).unwrap();
    assert_eq!(s.observe_val_loss(10, 2.0), None, "first loss is the best");
    assert_eq!(
        s.observe_val_loss(20, 1.995),
        None,
        "0.25% better is below the 1% threshold: bad 1"
    );
    assert_eq!(s.observe_val_loss(30, 1.5), None, "improvement resets");
    assert_eq!(s.observe_val_loss(40, 1.6), None, "bad 1");
    assert_eq!(s.observe_val_loss(50, 1.6), None, "bad 2");
    assert_eq!(s.observe_val_loss(60, 1.6), Some(0.5), "bad 3 > patience 2");
    assert_eq!(s.lr(61), 0.5);
    assert_eq!(
        s.observe_val_loss(70, 1.6),
        None,
        "cooldown evaluation is not counted"
    );
    assert_eq!(s.observe_val_loss(80, 1.6), None, "bad 1");
    assert_eq!(s.observe_val_loss(90, 1.6), None, "bad 2");
    assert_eq!(
        s.observe_val_loss(100, 1.6),
        Some(0.3),
        "0.25 is floored at min_lr"
    );
    for step in 110..120 {
        assert_eq!(
            s.observe_val_loss(step * 10, f64::NAN),
            None,
            "already at the floor"
        );
    }
    assert_eq!(s.lr(2000), 0.3);
}

#[test]
fn plateau_ignores_bad_evaluations_during_warmup() {
    let mut s = Schedule::new(plateau(100, 0, 0, 0.0), 1.0, 1000).unwrap();
    assert_eq!(s.observe_val_loss(20, 3.0), None);
    assert_eq!(
        s.observe_val_loss(40, 3.5),
        None,
        "during warmup: not counted"
    );
    assert_eq!(s.observe_val_loss(60, 2.0), None, "but the best is tracked");
    assert!(close(s.lr(49), 0.5));
    assert_eq!(
        s.observe_val_loss(100, 2.5),
        Some(0.5),
        "after warmup, 2.5 is worse than 2.0"
    );
    assert!(close(s.lr(49), 0.25), "warmup scales the reduced rate");
}

#[test]
fn other_schedules_ignore_validation_loss() {
    let mut s = Schedule::new(ScheduleConfig::Constant { warmup_steps: 0 }, 0.1, 10).unwrap();
    for step in 0..20 {
        assert_eq!(s.observe_val_loss(step, 100.0 + step as f64), None);
    }
    assert_eq!(s.lr(5), 0.1);
}

#[test]
fn restored_schedule_continues_identically() {
    let losses = [
        2.0, 1.8, 1.81, 1.79, 1.8, 1.8, 1.78, 1.9, 1.9, 1.9, 1.9, 1.7, 1.75, 1.76, 1.77,
    ];
    let config = plateau(3, 1, 1, 1e-4);
    let mut original = Schedule::new(config.clone(), 0.37, 100).unwrap();
    let mut lrs = Vec::new();
    let mut saved = None;
    for (i, loss) in losses.iter().enumerate() {
        let step = i as u64;
        lrs.push(original.lr(step));
        original.observe_val_loss(step, *loss);
        if i == 6 {
            saved = Some(serde_json::to_string(&original.state()).unwrap());
        }
    }
    let state: ScheduleState = serde_json::from_str(&saved.unwrap()).unwrap();
    let mut resumed = Schedule::new(config, 0.37, 100).unwrap();
    resumed.restore(state).unwrap();
    for (i, loss) in losses.iter().enumerate().skip(7) {
        let step = i as u64;
        assert_eq!(resumed.lr(step).to_bits(), lrs[i].to_bits(), "step {step}");
        resumed.observe_val_loss(step, *loss);
    }
    assert_eq!(resumed.state(), original.state());
    assert!(lrs.last().unwrap() < &0.37, "the run did reduce: {lrs:?}");
}

#[test]
fn restore_rejects_a_state_of_another_kind() {
    let mut cosine = Schedule::new(ScheduleConfig::default(), 0.1, 10).unwrap();
    let plateau_state = Schedule::new(plateau(0, 1, 0, 0.0), 0.1, 10)
        .unwrap()
        .state();
    let err = cosine.restore(plateau_state).unwrap_err().to_string();
    assert!(
        err.contains("plateau schedule, but the recipe asks for cosine"),
        "{err}"
    );
    cosine.restore(ScheduleState::Cosine).unwrap();
}

#[test]
fn config_parses_with_defaults_and_rejects_unknown_or_bad_fields() {
    let config: ScheduleConfig = serde_yaml_ng::from_str("kind: plateau\npatience: 3").unwrap();
    assert_eq!(
        config,
        ScheduleConfig::Plateau {
            warmup_steps: 0,
            factor: 0.1,
            patience: 3,
            threshold: 1e-4,
            cooldown: 0,
            min_lr: 0.0
        }
    );
    let config: ScheduleConfig =
        serde_yaml_ng::from_str("kind: cosine\nwarmup_steps: 50\nmin_lr_ratio: 0.1").unwrap();
    assert_eq!(
        config,
        ScheduleConfig::Cosine {
            warmup_steps: 50,
            min_lr_ratio: 0.1
        }
    );
    let err = serde_yaml_ng::from_str::<ScheduleConfig>("kind: cosine\nwarmup: 50").unwrap_err();
    assert!(err.to_string().contains("warmup"), "{err}");
    assert!(serde_yaml_ng::from_str::<ScheduleConfig>("kind: linear").is_err());

    let err = |config, total| Schedule::new(config, 0.1, total).unwrap_err().to_string();
    assert!(err(
        ScheduleConfig::Cosine {
            warmup_steps: 10,
            min_lr_ratio: 0.0
        },
        10
    )
    .contains("schedule.warmup_steps (10) must be below the stage's steps (10)"));
    assert!(err(
        ScheduleConfig::Cosine {
            warmup_steps: 0,
            min_lr_ratio: 1.5
        },
        10
    )
    .contains("min_lr_ratio"));
    let no_reduction = ScheduleConfig::Plateau {
        warmup_steps: 0,
        factor: 1.0,
        patience: 1,
        threshold: 0.01,
        cooldown: 0,
        min_lr: 0.0,
    };
    assert!(err(no_reduction, 10).contains("schedule.factor"));
    assert!(err(plateau(0, 1, 0, 0.5), 10).contains("schedule.min_lr"));
}
