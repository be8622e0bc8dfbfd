package graph

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strconv"

	"github.com/99designs/gqlgen/graphql"
	"github.com/99designs/gqlgen/graphql/handler/lru"
	"github.com/vektah/gqlparser/v2/ast"
	"github.com/vektah/gqlparser/v2/gqlerror"

	"rendezvous/graph/scalar"
)

// jsonLiterals keeps rule 13 for inline literals. gqlgen hands a literal
// argument to the scalar as Go maps (keys sorted, numbers parsed: a big
// integer in eventData even panicked in gqlparser's argument map). After
// validation, each literal given where the JSON scalar is expected becomes
// a reference to a variable of its own, whose value is the literal's JSON
// rendering (scalar.LiteralJSON: source order, numbers as written). The
// rewritten document is a copy: the parsed one is shared through the query
// cache. Its synthetic variable names contain a space, so no client
// variable can collide with them.
type jsonLiterals struct {
	plans *lru.LRU[*literalPlan]
}

var _ interface {
	graphql.HandlerExtension
	graphql.OperationContextMutator
} = jsonLiterals{}

func newJSONLiterals() jsonLiterals {
	return jsonLiterals{plans: lru.New[*literalPlan](1000)}
}

func (jsonLiterals) ExtensionName() string                   { return "JSONLiterals" }
func (jsonLiterals) Validate(graphql.ExecutableSchema) error { return nil }

// literalPlan is an operation's rewrite: the copied document and
// operation, and the literals to render per request.
type literalPlan struct {
	doc   *ast.QueryDocument
	op    *ast.OperationDefinition
	slots []literalSlot
	// defaults: JSON-typed variables whose default value is a literal.
	defaults []*ast.VariableDefinition
}

type literalSlot struct {
	name string
	lit  *ast.Value
}

func (j jsonLiterals) MutateOperationContext(ctx context.Context, rc *graphql.OperationContext) *gqlerror.Error {
	p := j.plan(ctx, rc)
	if p == nil {
		return nil
	}
	if len(p.slots) > 0 && rc.Variables == nil {
		rc.Variables = map[string]any{}
	}
	for _, d := range p.defaults {
		// Sent by the client, a JSON variable is raw (or nil for null); a
		// decoded value is the validator's rendering of the default.
		if v, ok := rc.Variables[d.Variable]; ok && v != nil {
			if _, raw := v.(json.RawMessage); !raw {
				out, err := scalar.LiteralJSON(d.DefaultValue, rc.Variables)
				if err != nil {
					return literalError(ctx, err, d.DefaultValue)
				}
				rc.Variables[d.Variable] = out
			}
		}
	}
	for _, s := range p.slots {
		out, err := scalar.LiteralJSON(s.lit, rc.Variables)
		if err != nil {
			return literalError(ctx, err, s.lit)
		}
		rc.Variables[s.name] = out
	}
	rc.Doc, rc.Operation = p.doc, p.op
	return nil
}

func literalError(ctx context.Context, err error, at *ast.Value) *gqlerror.Error {
	msg := err.Error()
	var ge *gqlerror.Error
	if errors.As(err, &ge) {
		msg = ge.Message
	}
	e := &gqlerror.Error{Message: msg, Extensions: errorExtensions(ctx, scalar.CodeBadUserInput)}
	if at != nil && at.Position != nil {
		e.Locations = []gqlerror.Location{{Line: at.Position.Line, Column: at.Position.Column}}
	}
	return e
}

// plan returns the operation's rewrite, nil when it has no JSON literal.
func (j jsonLiterals) plan(ctx context.Context, rc *graphql.OperationContext) *literalPlan {
	key := rc.OperationName + "\x00" + rc.RawQuery
	if p, ok := j.plans.Get(ctx, key); ok {
		return p
	}
	p := newLiteralPlan(rc.Doc, rc.Operation)
	if len(key) <= maxCachedQueryBytes {
		j.plans.Add(ctx, key, p)
	}
	return p
}

func newLiteralPlan(doc *ast.QueryDocument, op *ast.OperationDefinition) *literalPlan {
	var w literalRewriter
	p := &literalPlan{}
	for _, d := range op.VariableDefinitions {
		if d.DefaultValue != nil && d.Type != nil && d.Type.Elem == nil && d.Type.NamedType == "JSON" {
			p.defaults = append(p.defaults, d)
		}
	}
	sel, opChanged := w.selections(op.SelectionSet)
	// Each fragment once, not per spread: linear in the document.
	frags, cloned := doc.Fragments, false
	for i, f := range doc.Fragments {
		if fs, changed := w.selections(f.SelectionSet); changed {
			if !cloned {
				frags, cloned = slices.Clone(doc.Fragments), true
			}
			c := *f
			c.SelectionSet = fs
			frags[i] = &c
		}
	}
	if len(w.slots) == 0 {
		if len(p.defaults) == 0 {
			return nil
		}
		p.doc, p.op = doc, op
		return p
	}
	p.slots = w.slots
	p.op = op
	if opChanged {
		c := *op
		c.SelectionSet = sel
		p.op = &c
	}
	d := *doc
	d.Fragments = frags
	d.Operations = slices.Clone(doc.Operations)
	for i, o := range d.Operations {
		if o == op {
			d.Operations[i] = p.op
		}
	}
	p.doc = &d
	return p
}

// literalRewriter copies what it changes and shares the rest.
type literalRewriter struct {
	slots []literalSlot
}

func (w *literalRewriter) selections(ss ast.SelectionSet) (ast.SelectionSet, bool) {
	var out ast.SelectionSet
	for i, sel := range ss {
		var repl ast.Selection
		switch s := sel.(type) {
		case *ast.Field:
			args, argsChanged := w.arguments(s.Arguments)
			sub, subChanged := w.selections(s.SelectionSet)
			if argsChanged || subChanged {
				c := *s
				c.Arguments, c.SelectionSet = args, sub
				repl = &c
			}
		case *ast.InlineFragment:
			if sub, changed := w.selections(s.SelectionSet); changed {
				c := *s
				c.SelectionSet = sub
				repl = &c
			}
		}
		if repl != nil {
			if out == nil {
				out = slices.Clone(ss)
			}
			out[i] = repl
		}
	}
	if out == nil {
		return ss, false
	}
	return out, true
}

func (w *literalRewriter) arguments(args ast.ArgumentList) (ast.ArgumentList, bool) {
	var out ast.ArgumentList
	for i, a := range args {
		if v, changed := w.value(a.Value); changed {
			if out == nil {
				out = slices.Clone(args)
			}
			c := *a
			c.Value = v
			out[i] = &c
		}
	}
	if out == nil {
		return args, false
	}
	return out, true
}

// value replaces a literal where the JSON scalar is expected by a variable
// reference; inside an input object or list literal it looks deeper.
func (w *literalRewriter) value(v *ast.Value) (*ast.Value, bool) {
	if v == nil || v.Kind == ast.Variable || v.Kind == ast.NullValue {
		return v, false
	}
	if v.Definition != nil && v.Definition.Name == "JSON" && v.ExpectedType != nil && v.ExpectedType.Elem == nil {
		name := "json literal " + strconv.Itoa(len(w.slots))
		w.slots = append(w.slots, literalSlot{name: name, lit: v})
		c := *v
		c.Kind, c.Raw, c.Children = ast.Variable, name, nil
		c.VariableDefinition = &ast.VariableDefinition{Variable: name, Type: v.ExpectedType, Position: v.Position}
		return &c, true
	}
	if v.Kind != ast.ObjectValue && v.Kind != ast.ListValue {
		return v, false
	}
	var out ast.ChildValueList
	for i, ch := range v.Children {
		if cv, changed := w.value(ch.Value); changed {
			if out == nil {
				out = slices.Clone(v.Children)
			}
			c := *ch
			c.Value = cv
			out[i] = &c
		}
	}
	if out == nil {
		return v, false
	}
	c := *v
	c.Children = out
	return &c, true
}
