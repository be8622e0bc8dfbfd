// Query limits: depth, aliases and expanded fields of one operation.

package graph

import (
	"context"
	"fmt"

	"github.com/99designs/gqlgen/graphql"
	"github.com/vektah/gqlparser/v2/ast"
	"github.com/vektah/gqlparser/v2/gqlerror"
)

// queryLimits refuses operations nested deeper than maxDepth, with more
// than maxAliases aliased fields (the cheap way to multiply work in one
// request), or with more than maxFields fields once fragments are expanded.
// It runs before gqlgen's complexity limit, whose walk re-expands every
// fragment spread: a 1 KB query of fragments that spread the previous one
// twice would make it walk 2^n fields. Here each fragment is measured once.
type queryLimits struct{ maxDepth, maxAliases, maxFields int }

var (
	_ graphql.HandlerExtension        = queryLimits{}
	_ graphql.OperationContextMutator = queryLimits{}
)

func (queryLimits) ExtensionName() string                   { return "QueryLimits" }
func (queryLimits) Validate(graphql.ExecutableSchema) error { return nil }
func (l queryLimits) MutateOperationContext(_ context.Context, oc *graphql.OperationContext) *gqlerror.Error {
	m := measurer{doc: oc.Doc, memo: map[string]size{}, visiting: map[string]bool{}}
	sz := m.set(oc.Operation.SelectionSet)
	tooComplex := func(format string, args ...any) *gqlerror.Error {
		return &gqlerror.Error{Message: fmt.Sprintf(format, args...), Extensions: map[string]any{"code": codeTooComplex}}
	}
	switch {
	case sz.depth > l.maxDepth:
		return tooComplex("the operation is nested %d levels deep; at most %d are allowed", sz.depth, l.maxDepth)
	case sz.aliases > l.maxAliases:
		return tooComplex("the operation has %d aliased fields; at most %d are allowed", sz.aliases, l.maxAliases)
	case sz.fields > l.maxFields:
		return tooComplex("the operation's complexity is too high: it selects %d fields once fragments are expanded; at most %d are allowed", sz.fields, l.maxFields)
	}
	if oc.Operation.Operation == ast.Subscription {
		// Validation counts fields in the document; @skip/@include can
		// still leave none, and gqlgen's executor then calls a nil stream.
		if fields, _ := collectRootFields(oc); len(fields) != 1 {
			return &gqlerror.Error{
				Message:    fmt.Sprintf("a subscription must select exactly one field once @skip and @include are applied; this one selects %d", len(fields)),
				Extensions: map[string]any{"code": codeBadUserInput},
			}
		}
	}
	return nil
}

// size of a selection set: levels of nesting, aliased fields and fields,
// with fragments expanded. Counts saturate at sizeCap.
type size struct{ depth, aliases, fields int }

const sizeCap = 1 << 30

func (a size) plus(b size) size {
	return size{max(a.depth, b.depth), min(a.aliases+b.aliases, sizeCap), min(a.fields+b.fields, sizeCap)}
}

type measurer struct {
	doc      *ast.QueryDocument
	memo     map[string]size
	visiting map[string]bool // cycles are refused by validation; this keeps the walk finite
}

func (m measurer) set(set ast.SelectionSet) size {
	var total size
	for _, sel := range set {
		switch s := sel.(type) {
		case *ast.Field:
			child := m.set(s.SelectionSet)
			f := size{depth: child.depth + 1, aliases: child.aliases, fields: min(child.fields+1, sizeCap)}
			if s.Alias != "" && s.Alias != s.Name {
				f.aliases = min(f.aliases+1, sizeCap)
			}
			total = total.plus(f)
		case *ast.InlineFragment:
			// A level of its own: nesting fragments must not escape the
			// depth limit (every checker would have to follow it).
			child := m.set(s.SelectionSet)
			child.depth = min(child.depth+1, sizeCap)
			total = total.plus(child)
		case *ast.FragmentSpread:
			total = total.plus(m.fragment(s.Name))
		}
	}
	return total
}

func (m measurer) fragment(name string) size {
	if sz, ok := m.memo[name]; ok {
		return sz
	}
	fr := m.doc.Fragments.ForName(name)
	if fr == nil || m.visiting[name] {
		return size{}
	}
	m.visiting[name] = true
	sz := m.set(fr.SelectionSet)
	delete(m.visiting, name)
	m.memo[name] = sz
	return sz
}
