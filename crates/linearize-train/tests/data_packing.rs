mod data_common;

use data_common::{decode, ids, BOS, EOS};
use linearize_train::data::{pack, PackOptions, PackedSequences};

fn options(seq_len: usize, next_token_targets: bool, bos: Option<u32>) -> PackOptions {
    PackOptions {
        seq_len,
        next_token_targets,
        bos,
        eos: EOS,
    }
}

#[test]
fn documents_are_joined_with_bos_and_eos_and_cut_exactly() {
    let docs = [ids("abc"), ids("de"), ids("fghij")];
    // Stream: <s>abc</s><s>de</s><s>fghij</s> = 5 + 4 + 7 = 16 tokens.
    let (packed, stats) = pack(
        docs.iter().map(Vec::as_slice),
        &options(5, false, Some(BOS)),
    );
    assert_eq!(stats.documents, 3);
    assert_eq!(stats.stream_tokens, 16);
    assert_eq!(packed.len(), 3);
    assert_eq!(stats.dropped_tokens, 1);
    assert_eq!(packed.window(), 5);
    assert!(!packed.has_targets());
    let texts: Vec<String> = (0..packed.len())
        .map(|i| decode(packed.sequence(i)))
        .collect();
    assert_eq!(texts, ["<s>abc</s>", "<s>de</s><s>", "fghij"]);
}

#[test]
fn without_bos_only_eos_separates_documents() {
    let docs = [ids("ab"), ids("cd"), ids("e")];
    // ab</s>cd</s>e</s> = 8 tokens -> two sequences of 4, nothing dropped.
    let (packed, stats) = pack(docs.iter().map(Vec::as_slice), &options(4, false, None));
    assert_eq!(stats.dropped_tokens, 0);
    assert_eq!(decode(packed.tokens()), "ab</s>cd</s>e</s>");
    assert_eq!(packed.len(), 2);
}

#[test]
fn next_token_windows_overlap_by_one_and_cover_every_target_once() {
    let docs = [ids("hello world"), ids("second doc"), ids("x")];
    let opts = options(4, true, Some(BOS));
    let (packed, stats) = pack(docs.iter().map(Vec::as_slice), &opts);
    let stream = [
        ids("<s>hello world</s>"),
        ids("<s>second doc</s>"),
        ids("<s>x</s>"),
    ]
    .concat();
    assert_eq!(stats.stream_tokens, stream.len());
    assert_eq!(packed.window(), 5);
    assert_eq!(packed.seq_len(), 4);
    // (28 - 5) / 4 + 1 = 6 sequences use 5 * 4 + 5 = 25 tokens; 3 dropped.
    assert_eq!(stream.len(), 28);
    assert_eq!(packed.len(), 6);
    assert_eq!(stats.dropped_tokens, 3);
    for i in 0..packed.len() {
        assert_eq!(
            packed.sequence(i),
            &stream[i * 4..i * 4 + 5],
            "sequence {i}"
        );
    }
    for i in 1..packed.len() {
        assert_eq!(packed.sequence(i - 1)[4], packed.sequence(i)[0]);
    }
}

#[test]
fn bos_and_eos_already_in_a_document_are_not_doubled() {
    let docs = [ids("<s>[user] hi</s>"), ids("plain")];
    let (packed, stats) = pack(
        docs.iter().map(Vec::as_slice),
        &options(1, false, Some(BOS)),
    );
    assert_eq!(stats.dropped_tokens, 0);
    assert_eq!(decode(packed.tokens()), "<s>[user] hi</s><s>plain</s>");
}

#[test]
fn too_short_stream_gives_no_sequence_and_empty_documents_are_skipped() {
    let docs = [ids("abc"), Vec::new()];
    let (packed, stats) = pack(docs.iter().map(Vec::as_slice), &options(8, true, None));
    assert!(packed.is_empty());
    assert_eq!(stats.documents, 1);
    assert_eq!(stats.stream_tokens, 4);
    assert_eq!(stats.dropped_tokens, 4);
}

#[test]
fn from_tokens_checks_whole_sequences_and_append_checks_shape() {
    let err = PackedSequences::from_tokens(3, true, vec![0; 10]).unwrap_err();
    assert!(err.to_string().contains("4-token sequences"), "{err}");
    let mut a = PackedSequences::from_tokens(3, true, vec![7; 8]).unwrap();
    let b = PackedSequences::from_tokens(3, true, vec![9; 4]).unwrap();
    a.append(&b).unwrap();
    assert_eq!(a.len(), 3);
    assert_eq!(a.sequence(2), &[9, 9, 9, 9]);
    let c = PackedSequences::from_tokens(3, false, vec![9; 3]).unwrap();
    assert!(a.append(&c).is_err());
    a.truncate(1);
    assert_eq!(a.len(), 1);
}

#[test]
fn gather_and_eval_batches_shapes_and_sharding() {
    let tokens: Vec<u32> = (0..7 * 3).collect();
    let packed = PackedSequences::from_tokens(2, true, tokens).unwrap();
    let batch = packed.gather(&[4, 1]);
    assert_eq!(batch.size(), [2, 3]);
    assert_eq!(
        Vec::<i64>::try_from(batch.flatten(0, -1)).unwrap(),
        [12, 13, 14, 3, 4, 5]
    );

    let all: Vec<Vec<i64>> = packed
        .eval_batches(3, 0, 1)
        .unwrap()
        .map(|t| Vec::<i64>::try_from(t.select(1, 0)).unwrap())
        .collect();
    assert_eq!(all, [vec![0, 3, 6], vec![9, 12, 15], vec![18]]);
    let mut sharded: Vec<Vec<i64>> = Vec::new();
    for rank in 0..2 {
        sharded.extend(
            packed
                .eval_batches(3, rank, 2)
                .unwrap()
                .map(|t| Vec::<i64>::try_from(t.select(1, 0)).unwrap()),
        );
    }
    sharded.sort();
    assert_eq!(sharded, all);
    assert!(packed.eval_batches(3, 2, 2).is_err());
}

/// A long-context stage re-cuts the packed stream: the same tokens (up to the last whole longer
/// sequence) as packing the documents at that length directly, with and without targets.
#[test]
fn repacking_at_another_length_equals_packing_at_it() {
    let docs = [
        ids("hello world"),
        ids("second doc"),
        ids("x"),
        ids("a longer third one"),
    ];
    for targets in [true, false] {
        let (short, _) = pack(
            docs.iter().map(Vec::as_slice),
            &options(4, targets, Some(BOS)),
        );
        for len in [2, 8, 13] {
            let (direct, _) = pack(
                docs.iter().map(Vec::as_slice),
                &options(len, targets, Some(BOS)),
            );
            let repacked = short.repacked(len).unwrap();
            assert_eq!(repacked.seq_len(), len);
            assert_eq!(repacked.window(), direct.window());
            // The short packing dropped the stream's tail past its last sequence, so the
            // repacked sequences are a prefix of the direct ones.
            assert!(repacked.len() <= direct.len() && repacked.len() + 2 >= direct.len());
            assert_eq!(
                repacked.tokens(),
                &direct.tokens()[..repacked.tokens().len()],
                "length {len}, targets {targets}"
            );
        }
    }
    assert!(PackedSequences::from_tokens(4, true, Vec::new())
        .unwrap()
        .repacked(0)
        .is_err());
}
