//! Function calling in OpenAI-compatible streams: the `tool_calls` deltas of a
//! completion, assembled by `index` into whole calls (sans-IO, bounded).
//!
//! A provider streams each call as a first delta with its `index`, `id` and
//! `function.name`, then fragments of `function.arguments` under the same index;
//! parallel calls interleave by index. Providers differ in what they repeat, so an id
//! or name is taken from the first delta that has one, and argument fragments are
//! concatenated in arrival order.

use std::collections::BTreeMap;

use super::ToolCall;

/// Calls one completion may make at most (a model that emits more is broken).
pub const MAX_TOOL_CALLS: usize = 16;
/// Argument text of one completion at most, all calls together.
pub const MAX_ARGUMENT_BYTES: usize = 64 * 1024;

#[derive(Debug, Default)]
struct Partial {
    id: String,
    name: String,
    arguments: String,
}

/// The calls of one completion, as their deltas arrive.
#[derive(Debug, Default)]
pub struct ToolCallAssembly {
    calls: BTreeMap<u32, Partial>,
    argument_bytes: usize,
}

impl ToolCallAssembly {
    /// Whether no call has started.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// Takes one delta; `Err` (with the reason) when the stream breaks a bound.
    pub fn push(
        &mut self,
        index: u32,
        id: Option<&str>,
        name: Option<&str>,
        arguments: Option<&str>,
    ) -> Result<(), String> {
        if !self.calls.contains_key(&index) && self.calls.len() >= MAX_TOOL_CALLS {
            return Err(format!("more than {MAX_TOOL_CALLS} tool calls"));
        }
        let call = self.calls.entry(index).or_default();
        if let Some(id) = id.filter(|s| !s.is_empty())
            && call.id.is_empty()
        {
            call.id = id.to_owned();
        }
        if let Some(name) = name.filter(|s| !s.is_empty())
            && call.name.is_empty()
        {
            call.name = name.to_owned();
        }
        if let Some(fragment) = arguments {
            self.argument_bytes = self.argument_bytes.saturating_add(fragment.len());
            if self.argument_bytes > MAX_ARGUMENT_BYTES {
                return Err(format!(
                    "tool call arguments over {MAX_ARGUMENT_BYTES} bytes"
                ));
            }
            call.arguments.push_str(fragment);
        }
        Ok(())
    }

    /// The whole calls, by index. A call without a name is an error; one without an
    /// id gets `call_<index>` (some providers omit ids); empty arguments are `{}`.
    pub fn finish(self) -> Result<Vec<ToolCall>, String> {
        self.calls
            .into_iter()
            .map(|(index, p)| {
                if p.name.is_empty() {
                    return Err(format!("tool call {index} has no function name"));
                }
                Ok(ToolCall {
                    id: if p.id.is_empty() {
                        format!("call_{index}")
                    } else {
                        p.id
                    },
                    name: p.name,
                    arguments: if p.arguments.trim().is_empty() {
                        "{}".to_owned()
                    } else {
                        p.arguments
                    },
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn parallel_calls_interleaved_by_index_assemble_in_index_order() {
        let mut a = ToolCallAssembly::default();
        a.push(1, Some("call_b"), Some("transfer_call"), Some(""))
            .unwrap();
        a.push(0, Some("call_a"), Some("end_call"), Some("{\"rea"))
            .unwrap();
        a.push(1, None, None, Some("{\"to\":\"desk\"}")).unwrap();
        a.push(0, None, None, Some("son\":\"done\"}")).unwrap();
        let calls = a.finish().unwrap();
        assert_eq!(
            calls,
            vec![
                ToolCall {
                    id: "call_a".into(),
                    name: "end_call".into(),
                    arguments: "{\"reason\":\"done\"}".into()
                },
                ToolCall {
                    id: "call_b".into(),
                    name: "transfer_call".into(),
                    arguments: "{\"to\":\"desk\"}".into()
                },
            ]
        );
    }

    #[test]
    fn repeated_ids_and_names_keep_the_first_and_missing_ones_are_filled_or_refused() {
        let mut a = ToolCallAssembly::default();
        a.push(0, None, Some("end_call"), None).unwrap();
        a.push(0, Some("x"), Some("other"), None).unwrap();
        let calls = a.finish().unwrap();
        assert_eq!(
            (calls[0].id.as_str(), calls[0].name.as_str()),
            ("x", "end_call")
        );
        assert_eq!(
            calls[0].arguments, "{}",
            "no arguments read as an empty object"
        );

        let mut nameless = ToolCallAssembly::default();
        nameless.push(3, Some("c"), None, Some("{}")).unwrap();
        assert!(nameless.finish().is_err());
    }

    #[test]
    fn too_many_calls_or_too_much_argument_text_is_refused() {
        let mut a = ToolCallAssembly::default();
        for i in 0..MAX_TOOL_CALLS as u32 {
            a.push(i, Some("c"), Some("f"), None).unwrap();
        }
        assert!(a.push(99, Some("c"), Some("f"), None).is_err());
        let mut b = ToolCallAssembly::default();
        let big = "x".repeat(MAX_ARGUMENT_BYTES);
        b.push(0, Some("c"), Some("f"), Some(&big)).unwrap();
        assert!(b.push(0, None, None, Some("y")).is_err());
    }

    proptest! {
        // Arguments split anywhere (on char boundaries) reassemble to the same text,
        // and arbitrary deltas never panic.
        #[test]
        fn any_split_of_the_arguments_reassembles_them_exactly(
            args in ".{0,300}",
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let chars: Vec<char> = args.chars().collect();
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(chars.len() + 1)).collect();
            points.sort_unstable();
            let mut a = ToolCallAssembly::default();
            a.push(0, Some("id"), Some("f"), None).unwrap();
            let mut last = 0;
            for p in points.into_iter().chain([chars.len()]) {
                let piece: String = chars[last..p].iter().collect();
                a.push(0, None, None, Some(&piece)).unwrap();
                last = p;
            }
            let calls = a.finish().unwrap();
            let expected = if args.trim().is_empty() { "{}".to_owned() } else { args.clone() };
            prop_assert_eq!(&calls[0].arguments, &expected);
        }

        #[test]
        fn arbitrary_tool_call_deltas_never_panic(
            deltas in prop::collection::vec(
                (any::<u32>(), proptest::option::of(".{0,8}"), proptest::option::of(".{0,8}"), proptest::option::of(".{0,40}")),
                0..40,
            ),
        ) {
            let mut a = ToolCallAssembly::default();
            for (i, id, name, args) in &deltas {
                let _ = a.push(*i, id.as_deref(), name.as_deref(), args.as_deref());
            }
            let _ = a.finish();
        }
    }
}
