//! Small constructors for graph pieces, shared by the rewrite and the importers.

use super::dtype;
use super::proto::{
    attribute_proto::AttributeType, tensor_proto::DataLocation, tensor_shape_proto, type_proto, AttributeProto,
    NodeProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use bytes::Bytes;

/// An inline tensor from raw little-endian bytes.
pub fn tensor_raw(name: &str, data_type: i32, dims: &[i64], raw: impl Into<Bytes>) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        data_type: Some(data_type),
        dims: dims.to_vec(),
        raw_data: Some(raw.into()),
        ..Default::default()
    }
}

pub fn tensor_f32(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
    tensor_raw(name, dtype::FLOAT, dims, data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
}

pub fn tensor_i64(name: &str, dims: &[i64], data: &[i64]) -> TensorProto {
    tensor_raw(name, dtype::INT64, dims, data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
}

/// A tensor whose bytes the save step asks for later: marked external with a location
/// that names no file, so `save_model`'s resolver must supply it.
pub fn tensor_deferred(name: &str, data_type: i32, dims: &[i64], key: &str) -> TensorProto {
    let mut t =
        TensorProto { name: Some(name.into()), data_type: Some(data_type), dims: dims.to_vec(), ..Default::default() };
    t.set_data_location(DataLocation::External);
    t.external_data =
        vec![StringStringEntryProto { key: Some("location".into()), value: Some(format!("{DEFERRED}{key}")) }];
    t
}

/// Location prefix of deferred tensors (never a valid file name in a saved model).
pub const DEFERRED: &str = "deferred:";

pub fn node(
    op: &str,
    domain: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attrs: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        domain: if domain.is_empty() { None } else { Some(domain.into()) },
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

pub fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

pub fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}

pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

pub fn attr_tensor(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Tensor as i32),
        t: Some(t),
        ..Default::default()
    }
}

/// A dimension: a number, or a symbolic name.
pub enum Dim<'a> {
    Fixed(i64),
    Sym(&'a str),
}

pub fn value_info(name: &str, elem_type: i32, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Fixed(v) => tensor_shape_proto::dimension::Value::DimValue(*v),
                Dim::Sym(s) => tensor_shape_proto::dimension::Value::DimParam(s.to_string()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem_type),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Reads an int attribute of a node.
pub fn get_int(n: &NodeProto, name: &str) -> Option<i64> {
    n.attribute.iter().find(|a| a.name() == name).and_then(|a| a.i)
}
