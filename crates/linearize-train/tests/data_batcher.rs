use linearize_train::data::{Batcher, Budget, DataCursor, PackedSequences};

/// `n` sequences of `seq_len + 1` tokens; every token of sequence `i` is `i`, so a batch
/// tells which sequences it holds.
fn numbered(n: usize, seq_len: usize) -> PackedSequences {
    let tokens = (0..n as u32)
        .flat_map(|i| std::iter::repeat_n(i, seq_len + 1))
        .collect();
    PackedSequences::from_tokens(seq_len, true, tokens).unwrap()
}

fn ids(batcher: &mut Batcher) -> Option<Vec<u32>> {
    let batch = batcher.next_batch()?;
    assert_eq!(batch.tokens.kind(), tch::Kind::Int64);
    assert_eq!(batch.tokens.device(), tch::Device::Cpu);
    Some(
        Vec::<i64>::try_from(batch.tokens.select(1, 0))
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect(),
    )
}

fn take(batcher: &mut Batcher, steps: usize) -> Vec<Vec<u32>> {
    (0..steps).map(|_| ids(batcher).expect("a batch")).collect()
}

#[test]
fn batches_have_the_requested_shape_inputs_and_targets() {
    let tokens: Vec<u32> = (0..4 * 5).collect();
    let data = PackedSequences::from_tokens(4, true, tokens).unwrap();
    let mut batcher = Batcher::new(data, 2, 0).unwrap().with_shuffle(false);
    let batch = batcher.next_batch().unwrap();
    assert_eq!(batch.tokens.size(), [2, 5]);
    assert_eq!(batch.inputs().size(), [2, 4]);
    assert_eq!(batch.num_tokens(), 8);
    let inputs = Vec::<i64>::try_from(batch.inputs().flatten(0, -1)).unwrap();
    let targets = Vec::<i64>::try_from(batch.targets().unwrap().flatten(0, -1)).unwrap();
    assert_eq!(inputs, [0, 1, 2, 3, 5, 6, 7, 8]);
    assert_eq!(targets, [1, 2, 3, 4, 6, 7, 8, 9]);

    let plain = PackedSequences::from_tokens(4, false, (0..8).collect()).unwrap();
    let batch = Batcher::new(plain, 1, 0).unwrap().next_batch().unwrap();
    assert!(batch.targets().is_none());
}

#[test]
fn each_epoch_is_a_seeded_permutation() {
    let run = |seed| {
        let mut b = Batcher::new(numbered(12, 2), 3, seed).unwrap();
        take(&mut b, 8).concat()
    };
    let a = run(7);
    assert_eq!(a, run(7), "same seed, same order");
    assert_ne!(a, run(8), "another seed, another order");
    let (first, second) = a.split_at(12);
    for epoch in [first, second] {
        let mut sorted = epoch.to_vec();
        sorted.sort();
        assert_eq!(sorted, (0..12).collect::<Vec<_>>());
    }
    assert_ne!(first, second, "epochs are reshuffled");
}

#[test]
fn without_shuffle_sequences_come_in_order_and_the_tail_is_skipped() {
    let mut b = Batcher::new(numbered(7, 2), 3, 1)
        .unwrap()
        .with_shuffle(false);
    assert_eq!(b.steps_per_epoch(), 2);
    assert_eq!(
        take(&mut b, 3),
        [vec![0, 1, 2], vec![3, 4, 5], vec![0, 1, 2]]
    );
    assert_eq!(
        b.cursor(),
        DataCursor {
            epoch: 1,
            index: 3,
            consumed: 9,
            steps: 3
        }
    );
}

#[test]
fn resume_from_a_saved_cursor_gives_the_identical_remaining_batches() {
    let fresh = || Batcher::new(numbered(10, 3), 2, 42).unwrap();
    let mut straight = fresh();
    let all = take(&mut straight, 13);

    let mut first = fresh();
    let head = take(&mut first, 6);
    let saved = serde_json::to_string(&first.cursor()).unwrap();
    drop(first);
    let mut resumed = fresh();
    resumed.seek(serde_json::from_str(&saved).unwrap()).unwrap();
    let tail = take(&mut resumed, 7);
    assert_eq!([head, tail].concat(), all);
    assert_eq!(resumed.cursor(), straight.cursor());
}

#[test]
fn ranks_together_cover_the_global_order() {
    let global: Vec<u32> = {
        let mut b = Batcher::new(numbered(24, 2), 1, 5).unwrap();
        take(&mut b, 48).concat()
    };
    for world in [2, 3, 4] {
        let mut ranks: Vec<Batcher> = (0..world)
            .map(|r| {
                Batcher::new(numbered(24, 2), 2, 5)
                    .unwrap()
                    .with_shard(r, world)
                    .unwrap()
            })
            .collect();
        let steps = 48 / (2 * world);
        let mut union = Vec::new();
        for _ in 0..steps {
            for rank in ranks.iter_mut() {
                union.extend(ids(rank).unwrap());
            }
        }
        assert_eq!(union, global, "world size {world}");
        let cursors: Vec<DataCursor> = ranks.iter().map(Batcher::cursor).collect();
        assert!(
            cursors.iter().all(|c| *c == cursors[0]),
            "ranks agree on the cursor"
        );
    }
}

#[test]
fn a_job_resumed_with_another_world_size_continues_the_global_order() {
    let global: Vec<u32> = {
        let mut b = Batcher::new(numbered(12, 2), 1, 9).unwrap();
        take(&mut b, 12).concat()
    };
    let world_two: Vec<Batcher> = (0..2)
        .map(|r| {
            Batcher::new(numbered(12, 2), 1, 9)
                .unwrap()
                .with_shard(r, 2)
                .unwrap()
        })
        .collect();
    let mut seen = Vec::new();
    let mut ranks = world_two;
    for _ in 0..3 {
        for rank in ranks.iter_mut() {
            seen.extend(ids(rank).unwrap());
        }
    }
    let cursor = ranks[0].cursor();
    assert_eq!(cursor.index, 6);

    let mut ranks: Vec<Batcher> = (0..3)
        .map(|r| {
            let mut b = Batcher::new(numbered(12, 2), 1, 9)
                .unwrap()
                .with_shard(r, 3)
                .unwrap();
            b.seek(cursor).unwrap();
            b
        })
        .collect();
    for _ in 0..2 {
        for rank in ranks.iter_mut() {
            seen.extend(ids(rank).unwrap());
        }
    }
    assert_eq!(seen, global);
    assert_eq!(
        ranks[2].cursor(),
        DataCursor {
            epoch: 0,
            index: 12,
            consumed: 12,
            steps: 5
        }
    );
}

#[test]
fn budgets_stop_the_batcher_and_remaining_steps_predicts_it() {
    // 10 sequences of 4 tokens, 2 ranks x 2 = 4 sequences (16 tokens) per step, 2 steps/epoch.
    let cases = [
        (
            Budget {
                max_tokens: Some(100),
                ..Budget::default()
            },
            6,
        ),
        (
            Budget {
                max_tokens: Some(95),
                ..Budget::default()
            },
            5,
        ),
        (
            Budget {
                max_tokens: Some(15),
                ..Budget::default()
            },
            0,
        ),
        (
            Budget {
                max_steps: Some(3),
                ..Budget::default()
            },
            3,
        ),
        (
            Budget {
                max_epochs: Some(2),
                ..Budget::default()
            },
            4,
        ),
        (
            Budget {
                max_epochs: Some(2),
                max_steps: Some(9),
                max_tokens: Some(10_000),
            },
            4,
        ),
    ];
    for (budget, expected) in cases {
        let make = || {
            Batcher::new(numbered(10, 4), 2, 3)
                .unwrap()
                .with_shard(1, 2)
                .unwrap()
                .with_budget(budget)
        };
        let mut batcher = make();
        assert_eq!(batcher.remaining_steps(), Some(expected), "{budget:?}");
        let mut steps = 0;
        while batcher.next_batch().is_some() {
            steps += 1;
            assert_eq!(
                batcher.remaining_steps(),
                Some(expected - steps),
                "{budget:?} after {steps}"
            );
        }
        assert_eq!(steps, expected, "{budget:?}");
        assert!(batcher.next_batch().is_none(), "stays stopped");
        assert!(batcher.cursor().consumed * 4 <= budget.max_tokens.unwrap_or(u64::MAX));
    }
    let unlimited = Batcher::new(numbered(10, 4), 2, 3).unwrap();
    assert_eq!(unlimited.remaining_steps(), None);
}

#[test]
fn budget_counts_from_the_resumed_cursor() {
    let budget = Budget {
        max_tokens: Some(4 * 2 * 5),
        ..Budget::default()
    };
    let mut first = Batcher::new(numbered(6, 4), 2, 0)
        .unwrap()
        .with_budget(budget);
    take(&mut first, 3);
    let mut resumed = Batcher::new(numbered(6, 4), 2, 0)
        .unwrap()
        .with_budget(budget);
    resumed.seek(first.cursor()).unwrap();
    assert_eq!(resumed.remaining_steps(), Some(2));
    assert_eq!(std::iter::from_fn(|| resumed.next_batch()).count(), 2);
}

#[test]
fn bad_shapes_and_cursors_are_rejected() {
    let err = Batcher::new(numbered(3, 2), 4, 0).unwrap_err();
    assert!(err.to_string().contains("3 training sequences"), "{err}");
    let err = Batcher::new(numbered(6, 2), 2, 0)
        .unwrap()
        .with_shard(0, 4)
        .unwrap_err();
    assert!(err.to_string().contains("4 ranks x 2"), "{err}");
    assert!(Batcher::new(numbered(6, 2), 2, 0)
        .unwrap()
        .with_shard(2, 2)
        .is_err());
    let mut b = Batcher::new(numbered(6, 2), 2, 0).unwrap();
    let err = b
        .seek(DataCursor {
            epoch: 0,
            index: 7,
            consumed: 7,
            steps: 3,
        })
        .unwrap_err();
    assert!(err.to_string().contains("only 6 sequences"), "{err}");
}
